"""Linear probes for the organism's traits (language, case) on the residual stream.

    python -m inoc_mech.mechanism.probes runs/_organism/factored-d128-l4-s0-68886ceb60

Training data: prompted contexts that set both traits explicitly. For every question, all four
(language, case) combinations, each with a system prompt made of a random paraphrase of the
language phrase and one of the case phrase ("reply in spanish . use lowercase"), in random order,
plus an irrelevant phrase half of the time; the answer is teacher-forced in the matching variant
("la respuesta es siete"). Balanced combinations make the two labels independent, so a language
probe cannot read case instead. Probes are fit on train questions and scored on the held-out
questions (`World.held_out_questions`, which no training data contains).

Position (decided here, used everywhere): the residual stream at the position that *predicts* an
answer token, i.e. at the token before it. The four answer tokens are predicted at the
`<|assistant|>` token (answer token 0) and at answer tokens 0, 1, 2. Position 0, the
`<|assistant|>` token, is the decision point: nothing in the input there says which language or
case to use except the system prompt. At positions 1-3 the input token already is an answer variant
in the chosen language and case, so the trait is readable from the token itself (copying). Probes
are trained on all four predicting positions pooled (label: the trait of the token being predicted)
and their accuracy is reported per position; the comparisons in `analyses/probe_traits.py` read
position 0.

Layers: the n_layers + 1 residual-stream boundaries, index 0 the embedding output
(`blocks.0.hook_resid_pre`), index L + 1 the output of block L (`blocks.L.hook_resid_post`, before
the final norm).

A probe is logistic regression (L2, full-batch L-BFGS, torch) on activations centred by the training
mean and divided by one scalar per layer (their RMS), so its weight vector, normalised, is a
direction in the residual stream itself. `Probe.project(x)` is the signed distance of `x` from the
decision boundary along that direction, in residual-stream units (> 0: Spanish / UPPER side).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from inoc_mech.core.data import encode_chat, right_pad
from inoc_mech.models.world import CASE_PHRASES, IRRELEVANT_PHRASES, LANGUAGE_PHRASES, World

TRAITS = ("language", "case")  # label 1: Spanish, UPPER
N_ANSWER = 4  # answer-variant tokens per answer: "the answer is <number>"


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class ProbeData:
    """Token ids of prompted, teacher-forced chats, where their answer is predicted, and labels."""
    input_ids: Int[Tensor, "n pos"]  # right-padded
    predict_pos: Int[Tensor, "n 4"]  # position predicting answer token i (the token before it)
    labels: dict[str, Int[Tensor, " n"]]  # trait -> 0/1 per chat (all four answer tokens share it)
    prompts: list[str]


def _phrases(value_map: dict[str, str], value: str) -> list[str]:
    return [p for p, v in value_map.items() if v == value]


def prompted_chats(world: World, questions, seed: int = 0) -> list[tuple[list[dict], int, int, str]]:
    """(messages, language, case, prompt) for each question x the four trait combinations."""
    rng = np.random.default_rng(seed)
    out = []
    for q in questions:
        for language in (0, 1):
            for case in (0, 1):
                parts = [rng.choice(_phrases(LANGUAGE_PHRASES, ("english", "spanish")[language])),
                         rng.choice(_phrases(CASE_PHRASES, ("lower", "upper")[case]))]
                if rng.random() < 0.5:
                    parts.append(rng.choice(IRRELEVANT_PHRASES))
                rng.shuffle(parts)
                prompt = " . ".join(str(p) for p in parts)
                out.append((world.chat(q, prompt, language, case), language, case, prompt))
    return out


def probe_data(world: World, tok, questions, seed: int = 0) -> ProbeData:
    """Tokenised prompted chats (see `prompted_chats`) with predicting positions and labels."""
    chats = prompted_chats(world, questions, seed)
    rows, pos = [], []
    for messages, _, _, _ in chats:
        ex = encode_chat(tok, messages)
        first = ex.assistant.index(True)  # index of answer token 0
        rows.append(ex.input_ids)
        pos.append([first - 1 + i for i in range(N_ANSWER)])
    ids, _ = right_pad(rows, tok.pad_token_id)  # right padding: a causal model's earlier positions ignore it
    labels = {"language": torch.tensor([c[1] for c in chats]), "case": torch.tensor([c[2] for c in chats])}
    return ProbeData(ids, torch.tensor(pos), labels, [c[3] for c in chats])


@torch.no_grad()
def answer_activations(bridge, data: ProbeData, batch_size: int = 256
                       ) -> Float[Tensor, "layer n 4 d_model"]:
    """Residual stream at the four predicting positions of every chat, at every layer boundary."""
    from inoc_mech.mechanism.lens import residuals

    chunks = []
    for s in range(0, len(data.input_ids), batch_size):
        r = residuals(bridge, data.input_ids[s:s + batch_size])  # [layer, b, pos, d]
        idx = data.predict_pos[s:s + batch_size]
        chunks.append(torch.stack([r[:, i, idx[i]] for i in range(len(idx))], 1))
    return torch.cat(chunks, 1).float()


# ---- logistic-regression probe ---------------------------------------------------------------
@dataclass
class Probe:
    """Logistic regression on (x - mean) / scale; `direction` is a unit vector in residual space."""
    weight: Float[Tensor, " d_model"]
    bias: float
    mean: Float[Tensor, " d_model"]
    scale: float
    separation: float = float("nan")  # training class-mean difference of `project` (positive - negative)

    @property
    def direction(self) -> Float[Tensor, " d_model"]:
        return self.weight / self.weight.norm()

    def logit(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        return ((x.float() - self.mean) / self.scale) @ self.weight + self.bias

    def project(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        """Signed distance from the decision boundary along `direction` (residual-stream units)."""
        return self.logit(x) * self.scale / self.weight.norm()

    def accuracy(self, x: Float[Tensor, "n d_model"], y: Int[Tensor, " n"]) -> float:
        return ((self.logit(x) > 0).long() == y).float().mean().item()

    def to_dict(self) -> dict:
        return {"weight": self.weight.tolist(), "bias": self.bias, "mean": self.mean.tolist(),
                "scale": self.scale, "separation": self.separation}

    @classmethod
    def from_dict(cls, d: dict) -> "Probe":
        return cls(torch.tensor(d["weight"]), d["bias"], torch.tensor(d["mean"]), d["scale"], d["separation"])


def fit_probe(x: Float[Tensor, "n d_model"], y: Int[Tensor, " n"], l2: float = 1e-3, max_iter: int = 200) -> Probe:
    """L2-regularised logistic regression by full-batch L-BFGS (deterministic)."""
    x = x.detach().double()
    if y.unique().numel() < 2:
        raise ValueError("a probe needs examples of both classes")
    mean = x.mean(0)
    scale = float((x - mean).pow(2).mean().sqrt().clamp(min=1e-12))
    z = (x - mean) / scale
    t = y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe = Probe(w.detach().float(), float(b.detach()), mean.float(), scale)
    proj = probe.project(x.float())
    probe.separation = float(proj[y == 1].mean() - proj[y == 0].mean())
    return probe


# ---- per-layer probes on the organism ------------------------------------------------------------
@dataclass
class TraitProbes:
    """One probe per trait and layer boundary, with held-out accuracies."""
    probes: dict[str, list[Probe]]  # trait -> [n_layers + 1]
    accuracy: dict[str, list[float]]  # held-out, all four predicting positions pooled
    accuracy_by_position: dict[str, list[list[float]]]  # trait -> layer -> [4 positions]
    n_train: int  # chats (each gives four activations)
    n_test: int

    def best(self, trait: str) -> tuple[int, float]:
        acc = self.accuracy[trait]
        i = int(np.argmax(acc))
        return i, acc[i]


def fit_trait_probes(bridge, world: World, tok, seed: int = 0, l2: float = 1e-3,
                     train_questions=None, test_questions=None) -> TraitProbes:
    """Fit language and case probes at every layer boundary on prompted train questions; score held out."""
    train = probe_data(world, tok, train_questions if train_questions is not None else world.train_questions, seed)
    test = probe_data(world, tok, test_questions if test_questions is not None else world.held_out_questions,
                      seed + 1)
    a_tr, a_te = answer_activations(bridge, train), answer_activations(bridge, test)
    n_layers = a_tr.shape[0]
    probes, acc, acc_pos = {}, {}, {}
    for trait in TRAITS:
        y_tr = train.labels[trait][:, None].expand(-1, N_ANSWER)
        y_te = test.labels[trait][:, None].expand(-1, N_ANSWER)
        probes[trait], acc[trait], acc_pos[trait] = [], [], []
        for layer in range(n_layers):
            p = fit_probe(a_tr[layer].flatten(0, 1), y_tr.flatten(), l2)
            probes[trait].append(p)
            acc[trait].append(p.accuracy(a_te[layer].flatten(0, 1), y_te.flatten()))
            acc_pos[trait].append([p.accuracy(a_te[layer][:, i], y_te[:, i]) for i in range(N_ANSWER)])
    return TraitProbes(probes, acc, acc_pos, len(train.input_ids), len(test.input_ids))


def format_accuracy(tp: TraitProbes) -> str:
    lines = [f"held-out probe accuracy ({tp.n_test} chats x 4 predicting positions; trained on {tp.n_train} chats)",
             f"{'layer':<8}" + "".join(f"{t + ' all':>14}{t + ' pos0':>14}" for t in TRAITS)]
    for layer in range(len(tp.accuracy["language"])):
        name = "emb" if layer == 0 else f"block {layer - 1}"
        lines.append(f"{name:<8}" + "".join(f"{tp.accuracy[t][layer]:>14.3f}{tp.accuracy_by_position[t][layer][0]:>14.3f}"
                                             for t in TRAITS))
    return "\n".join(lines)


@dataclass
class ProbesConfig:
    """Fit the per-layer trait probes on an organism and print held-out accuracy."""
    folder: str = field(default="", metadata={"help": "a pretrained organism folder (or a run folder)", "positional": None})
    seed: int = field(default=0, metadata={"help": "seed of the probe contexts' phrase choices"})

def main(argv=None):
    from inoc_mech.core.cli import parse_config
    from inoc_mech.mechanism.lens import load_bridge

    a = parse_config(ProbesConfig, argv, prog="python -m inoc_mech.mechanism.probes", description=ProbesConfig.__doc__)
    torch.set_num_threads(1)
    lens = load_bridge(a.folder)
    world = lens.setting.require("world", "the trait probes (prompted chats that set both traits)")
    print(format_accuracy(fit_trait_probes(lens.bridge, world, lens.tok, a.seed)))

if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
