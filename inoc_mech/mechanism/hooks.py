"""Gradient-pressure instrumentation: trait-token losses, trait/rest gradient norms, weight updates.

    python -m inoc_mech.train --steps 20 --log-every 5 --grad-split-every 5 --name hooks-demo --overwrite

`GradientPressure` is a context manager the training loop enters once. Inside it three hooks are
registered and all are removed on exit:
- a forward hook on the output embedding (signature `fn(tensor, *, hook)`) keeps the logits of
  a logged step;
- an optimizer pre-step hook reads the total gradient (after backward, before the update);
- an optimizer post-step hook measures the update.
On grad-split steps each split trait costs one extra backward; by default the traits take turns
(all of them at step 0), `split_all=True` splits every trait each time. A decomposition that computes
some inputs without gradient (the text setting's counterfactual replies, `settings.base.Deferred`)
has the rest of each trait's gradient finished in the pre-step hook, after the training graph is freed.
Per logged step the loop calls `start(step)` before the forward, `measure(loss, batch)` between
the loss and `loss.backward()`, and `finish()` after `optimizer.step()`; `finish()` returns the
metrics (namespaced keys, see README "Metrics").

Trait losses. `trait_losses` returns, per trait, per-token loss contributions normalised by the
number of trained tokens, so that each trait's scalar loss is its additive share of the total loss
and its gradient is the trait's share of the total gradient (rest = total - trait, exactly).
The trait names are those of the batch's masks (`Example.traits`, made by the setting). When the
setting has an exact loss decomposition (`settings.base.Decomposition`, e.g. the organism's
word / language / case / interaction split), a trait's contribution is its part of the loss and the
parts are logged as `surprise/<part>` (mean per decomposed token); without one, a trait's
contribution is the full token loss on its masked tokens. Module names come from the model's
architecture table (`core.names`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from inoc_mech.core import dist
from inoc_mech.core.data import OTHER, trained_logprobs, wide
from inoc_mech.core.names import arch_names, group_name, module_name
from inoc_mech.settings.base import Parts

# ---- losses ------------------------------------------------------------------------------------
def trait_losses(logits: Float[Tensor, "batch pos vocab"], batch, decomposition=None, model=None,
                 n: Tensor | None = None) -> dict[str, Float[Tensor, "batch pos"]]:
    """Per-token loss contributions, normalised by the number of trained tokens (`n`: of the whole step,
    when the batch is one of its micro-batches; default the batch's own).

    Keys: `total`, `token` (the plain per-token loss, detached) and one per trait. With a decomposition
    (`settings.base.Decomposition`) a trait that has a part uses it and the parts are added as
    `part/<name>`; other traits use full token losses. `deferred` is the decomposition's
    (`settings.base.Deferred`: gradient through inputs it computed without gradient), else None.
    """
    input_ids, assistant, traits = batch.input_ids, batch.assistant, batch.traits
    tok_lp = trained_logprobs(logits, batch)  # normalised only where the loss is (soft labels: minus their CE)
    n = (assistant.sum() if n is None else n).clamp(min=1)
    nll = -tok_lp * assistant
    out = Parts({"total": nll / n, "token": -tok_lp.detach()})
    parts = decomposition.fn(logits, batch, model) if decomposition is not None else {}
    out.deferred = getattr(parts, "deferred", None)  # parts' inputs whose gradient is finished after backward
    of = decomposition.trait_part if decomposition is not None else {}
    per_reply = decomposition is not None and decomposition.over is None
    for name, mask in traits.items():
        src = parts[of[name]] if name in of else -tok_lp
        where = assistant if per_reply and name in of else mask & assistant  # a reply-level part sits at one token
        out[name] = src * where / n
    for name, v in parts.items():
        out[f"part/{name}"] = v * assistant / n
    return out


def decomposed_count(batch, decomposition, clamp: bool = True) -> Tensor:
    """What `surprise/<part>` is a mean over: decomposed tokens (token level) or replies (reply level)."""
    if decomposition.over is None:
        n = batch.assistant.any(-1).sum()
    else:
        n = (batch.traits[decomposition.over] & batch.assistant).sum()
    return n.clamp(min=1) if clamp else n


def graph_gradients(contrib: dict, names, params: list[Tensor]) -> tuple[dict[str, list[Tensor]], tuple | None]:
    """Each named loss's parameter gradient through the graph of `contrib` (`trait_losses`, graph kept),
    and what is left when a decomposition deferred part of it (`settings.base.Deferred`): pass that to
    `finish_gradients` (once the graph is no longer needed) for the whole gradient."""
    deferred = getattr(contrib, "deferred", None)
    inputs = params + ([deferred.leaf] if deferred is not None else [])
    grads, leaf_grads = {}, {}
    for name in names:
        g = dist.gradients(contrib[name].sum(), inputs, retain_graph=True)  # FSDP: local shards, summed
        grads[name] = [torch.zeros_like(dist.local(p)) if gi is None else gi for gi, p in zip(g, params)]
        if deferred is not None:
            leaf_grads[name] = torch.zeros_like(deferred.leaf) if g[-1] is None else g[-1]
    return grads, ((deferred, leaf_grads) if deferred is not None else None)


def finish_gradients(grads: dict[str, list[Tensor]], rest: tuple | None, params: list[Tensor]) -> None:
    """Add the deferred part of each gradient (`graph_gradients`' second value) in place."""
    if rest is None:
        return
    deferred, leaf_grads = rest
    for name, extra in zip(leaf_grads, deferred.finish(list(leaf_grads.values()), params)):
        torch._foreach_add_(grads[name], extra)


def loss_gradients(contrib: dict, names, params: list[Tensor]) -> dict[str, list[Tensor]]:
    """The whole parameter gradient of each named loss of `contrib` (what a grad split measures)."""
    grads, rest = graph_gradients(contrib, names, params)
    finish_gradients(grads, rest, params)
    return grads


ELICIT_CHUNK = 2 ** 27  # float32 log-softmax values held at once by the step-0 elicitation (512 MB)


def _add(sums: dict, key: str, num: Tensor, den: Tensor) -> None:
    """Accumulate a masked sum and its count over micro-batches (one batch: exactly the plain mean)."""
    if key in sums:
        sums[key] = [sums[key][0] + num, sums[key][1] + den]
    else:
        sums[key] = [num, den]


# ---- recorder ----------------------------------------------------------------------------------
class GradientPressure:
    """Records trait losses, trait/rest gradient norms and weight updates during training."""

    def __init__(self, model, optimizer, decomposition=None, log_every: int = 10,
                 grad_split_every: int = 50, split_traits: tuple[str, ...] | None = None,
                 split_all: bool = False, autocast=None):
        self.model, self.opt = model, optimizer
        # the training forward's precision context (e.g. bf16 autocast on CUDA), re-entered for the forwards the
        # instruments make themselves (a decomposition's counterfactual replies), so they match the trained one
        self.autocast = autocast if autocast is not None else nullcontext()
        self.decomposition = decomposition  # settings.base.Decomposition or None
        self.log_every, self.grad_split_every = log_every, grad_split_every
        self.split_traits = split_traits
        # one extra backward per split trait: by default the traits take turns (all of them at step 0)
        self.split_all = split_all
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = arch_names(model)
        self.modules = [module_name(n, names) for n, _ in self.named]
        self.groups = [group_name(n, names) for n, _ in self.named]
        self.sharded = dist.lockstep(model)  # FSDP: every tensor here is this process's shard; sums add over processes
        self._handles = []
        self._step = None
        self._logits = None
        self._pending: list[tuple[list[str], Tensor]] = []  # metrics as tensors until finish()
        self._trait_grads: dict[str, list[Tensor]] = {}
        self._deferred: list[tuple] = []  # per micro-batch of a split step: (Deferred, {trait: d part / d leaf})
        self._sums: dict[str, Tensor] = {}  # metrics summed over micro-batches and processes (the loss)
        self._means: dict[str, list[Tensor]] = {}  # metrics as [numerator, count] sums, a ratio at finish()

    # context manager ---------------------------------------------------------------------------
    def __enter__(self):
        with torch.no_grad():
            self.theta0 = [dist.local(p).detach().clone() for _, p in self.named]
        head = self.model.get_output_embeddings()
        self._handles = [
            head.register_forward_hook(lambda mod, inp, out: self._keep_logits(out, hook="unembed")),
            self.opt.register_step_pre_hook(lambda opt, args, kwargs: self._pre_step()),
            self.opt.register_step_post_hook(lambda opt, args, kwargs: self._post_step()),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._logits, self._trait_grads, self.theta0, self._deferred = [], None, {}, None, []
        return False

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0

    def splits(self, step: int) -> bool:
        return self.grad_split_every > 0 and step % self.grad_split_every == 0

    def _keep_logits(self, tensor, *, hook):
        if self._step is not None:
            self._logits = tensor
        return None

    # per step ----------------------------------------------------------------------------------
    def start(self, step: int, force: bool = False) -> bool:
        """Arm the recorder if `step` is logged (or `force`, e.g. the last step); returns whether it is."""
        self._step = step if (force or self.logs(step)) else None
        self._pending, self._trait_grads, self._logits, self._deferred = [], {}, None, []
        self._sums, self._means = {}, {}
        return self._step is not None

    def measure(self, loss: Tensor, batch, n_tokens: Tensor | int | None = None, logits: Tensor | None = None) -> None:
        """Loss metrics of one micro-batch, and on grad-split steps its share of the trait gradients (call
        before its backward). `loss` is its share of the step's loss (its token losses over `n_tokens`, the
        step's trained tokens over every micro-batch and process; default: this batch's own). `logits`: the
        micro-batch's logits aligned with `batch` (default: those the output embedding's hook saw, which a
        packed forward lays out otherwise, `core.forward`). Called once per micro-batch; `finish()` sums the
        shares over micro-batches and processes."""
        if self._step is None:
            return
        if logits is not None:
            self._logits = logits
        if self._logits is None:
            raise RuntimeError("GradientPressure saw no forward pass of the model since start()")
        n = batch.assistant.sum() if n_tokens is None else torch.as_tensor(n_tokens, device=batch.assistant.device)
        with torch.set_grad_enabled(self.splits(self._step)), self.autocast:  # part gradients only where split
            contrib = trait_losses(self._logits, batch, self.decomposition, self.model, n=n)
        with torch.no_grad():
            self._add_sum("loss/total", loss.detach())
            for name, mask in batch.traits.items():  # contrib[name] may be a loss part: read token losses
                m = mask & batch.assistant
                key = f"loss/{OTHER}" if name == OTHER else f"loss/trait/{name}"
                self._add_mean(key, (contrib["token"] * m).sum(), m.sum())
            d = self.decomposition
            if d is not None:
                var = decomposed_count(batch, d, clamp=False)
                for part in d.parts:
                    self._add_mean(f"surprise/{part}", contrib[f"part/{part}"].detach().sum() * n, var)
        if self.splits(self._step):
            names = self.split_traits or tuple(t for t in batch.traits if t != OTHER)
            if not (self.split_all or self._step == 0):  # turn depends on the step only (resume-safe)
                names = (names[(self._step // self.grad_split_every) % len(names)],)
            # the gradient through the training graph now; what a decomposition deferred, after backward (_pre_step)
            grads, rest = graph_gradients(contrib, names, [p for _, p in self.named])
            for name, g in grads.items():
                if name in self._trait_grads:
                    torch._foreach_add_(self._trait_grads[name], g)
                else:
                    self._trait_grads[name] = g
            if rest is not None:
                self._deferred.append(rest)
        self._logits = None

    def _pre_step(self):
        if self._step is None:
            return
        params = [p for _, p in self.named]
        grads = [dist.local(p.grad) if p.grad is not None else torch.zeros_like(dist.local(p)) for p in params]
        if self._deferred:  # the training graphs are freed: finish the trait gradients
            with self.autocast:
                for rest in self._deferred:
                    finish_gradients(self._trait_grads, rest, params)
            self._deferred = []
        if self._trait_grads and not self.sharded:  # each process holds its share: the sum is the step's trait gradient
            names = list(self._trait_grads)
            summed = dist.all_sum([g for n in names for g in self._trait_grads[n]])
            self._trait_grads = {n: summed[i * len(params):(i + 1) * len(params)] for i, n in enumerate(names)}
        with torch.no_grad():
            total_sq = self._sq_norms(grads)
            self._by("grad_norm/total", self.groups, total_sq)
            for name, tg in self._trait_grads.items():
                trait_sq = self._sq_norms(tg)
                rest_sq = self._sq_norms(torch._foreach_sub(grads, tg))
                self._by(f"grad_norm/trait/{name}", self.groups, trait_sq)
                t, r, g = trait_sq.sum(), rest_sq.sum(), total_sq.sum()
                self._put(f"grad_norm/rest/{name}", r.sqrt())
                dot = self._over_shards(torch.stack([(wide(a) * wide(b)).sum() for a, b in zip(grads, tg)]).sum())  # <g, t>:
                # from the norms, (||g||^2 + ||t||^2 - ||g - t||^2) / 2, it cancels when t is small
                self._put(f"grad_cos/trait/{name}", dot / (t.sqrt() * g.sqrt()).clamp(min=1e-30))
                self._put(f"grad_share/trait/{name}", t / g.clamp(min=1e-30))
            self._before = [dist.local(p).detach().clone() for _, p in self.named]
        self._logits = None  # the deferred forwards went through the head hook too

    def _post_step(self):
        if self._step is None:
            return
        with torch.no_grad():
            now = [dist.local(p).detach() for _, p in self.named]
            self._by("update_norm", self.modules, self._sq_norms(torch._foreach_sub(now, self.theta0)), total=True)
            self._by("step_update_norm", self.modules, self._sq_norms(torch._foreach_sub(now, self._before)), total=True)
            states = [self.opt.state.get(p, {}) for _, p in self.named]
            have = [i for i, st in enumerate(states) if "exp_avg_sq" in st]
            if have:
                v = [wide(dist.local(states[i]["exp_avg_sq"])) for i in have]
                sums = torch.stack(torch._foreach_norm(torch._foreach_sqrt(v), 1))  # sum of sqrt(v) per tensor
                counts = torch.tensor([float(x.numel()) for x in v], device=sums.device, dtype=sums.dtype)
                sums, counts = (x.cpu() for x in self._over_shards(sums, counts))
                names = sorted({self.modules[i] for i in have}, key=[self.modules[i] for i in have].index)
                idx = torch.tensor([names.index(self.modules[i]) for i in have])
                s_ = torch.zeros(len(names), dtype=sums.dtype).index_add_(0, idx, sums)
                c_ = torch.zeros(len(names), dtype=sums.dtype).index_add_(0, idx, counts)
                self._pending.append(([f"adam_v/{m}" for m in names], s_ / c_))
        self._before = None

    @torch.no_grad()
    def update_norms(self) -> dict[str, float]:
        """||theta - theta_0||_F per module now (0 before the first step). Sharded (FSDP): a collective, called
        on every process."""
        saved, self._pending = self._pending, []
        self._by("update_norm", self.modules,
                 self._sq_norms(torch._foreach_sub([dist.local(p).detach() for _, p in self.named], self.theta0)), total=True)
        out, self._pending = self._collect(), saved
        return out

    def finish(self) -> dict:
        """Metrics of the step just taken ({} when not logged); one host transfer for all of them. Under
        torchrun every process calls it (the sums over processes are a collective)."""
        if self._step is None:
            return {}
        sums, means = list(self._sums), list(self._means)
        parts = ([torch.stack([wide(self._sums[k]) for k in sums])] if sums else []) + \
                ([torch.stack([torch.stack([wide(x) for x in self._means[k]]) for k in means])] if means else [])
        got = dist.all_sum(parts)
        if sums:
            self._pending.insert(0, (sums, got[0]))
        if means:
            m = got[-1]
            self._pending.insert(1 if sums else 0, (means, m[:, 0] / m[:, 1].clamp(min=1)))
        out = self._collect()
        self._pending, self._step, self._trait_grads, self._sums, self._means = [], None, {}, {}, {}
        return out

    # helpers -----------------------------------------------------------------------------------
    def _sq_norms(self, tensors: list[Tensor]) -> Tensor:
        """Squared norm per tensor (sharded: of the whole tensor, the local squares added over processes)."""
        return self._over_shards(torch.stack(torch._foreach_norm([wide(t) for t in tensors])) ** 2)

    def _over_shards(self, *sums: Tensor):
        """Sums over this process's shards -> sums over the whole tensors (identity when not sharded)."""
        got = dist.all_sum(list(sums)) if self.sharded else list(sums)
        return got[0] if len(got) == 1 else got

    def _add_sum(self, key: str, value: Tensor):
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def _add_mean(self, key: str, num: Tensor, den: Tensor):
        self._means[key] = [self._means[key][0] + num, self._means[key][1] + den] if key in self._means else [num, den]

    def _put(self, key: str, value: Tensor):
        self._pending.append(([key], wide(value.detach()).reshape(1)))

    def _by(self, prefix: str, labels: list[str], sq: Tensor, total: bool = False):
        """Norms aggregated by label (group or module), from per-tensor squared norms."""
        names = list(dict.fromkeys(labels))
        idx = torch.tensor([names.index(l) for l in labels], device=sq.device)
        agg = torch.zeros(len(names), device=sq.device, dtype=sq.dtype).index_add_(0, idx, sq)
        self._pending.append(([f"{prefix}/total" if total else prefix], sq.sum().sqrt().reshape(1)))
        self._pending.append(([f"{prefix}/{n}" for n in names], agg.sqrt()))

    def _collect(self) -> dict:
        if not self._pending:
            return {}
        keys = [k for ks, _ in self._pending for k in ks]
        values = torch.cat([v.double().cpu() for _, v in self._pending]).tolist()
        return dict(zip(keys, values))


@torch.no_grad()
def elicitation(model, batch_context, batch_none, decomposition=None, chunk_elements: int = ELICIT_CHUNK) -> dict:
    """Mean trait-token log-prob of the same answers under the training context and under no prompt.

    `elicit/<trait>/gain` = logp_context - logp_none over the trait's tokens (whole-token log-prob).
    With a decomposition also per loss part, `elicit/part/<part>/gain` (nats per decomposed token),
    which separates traits whose token masks coincide (the organism's language and case). The examples
    go through the model in micro-batches whose float32 log-softmax holds at most `chunk_elements`
    values (one batch for the organism; a few examples at a time for a 49k-token vocabulary).
    """
    out = {}
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    for tag, whole in (("context", batch_context), ("none", batch_none)):
        n, T = whole.input_ids.shape
        size = max(1, min(n, chunk_elements // max(T * vocab, 1)))
        sums: dict[str, list[Tensor]] = {}
        for i in range(0, n, size):
            b = whole.slice(i, i + size)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            lp = trained_logprobs(logits, b)
            for name, mask in b.traits.items():
                m = mask & b.assistant
                _add(sums, f"elicit/{name}/logp_{tag}", (lp * m).sum(), m.sum())
            if decomposition is not None:
                var = b.traits[decomposition.over] & b.assistant if decomposition.over else b.assistant
                count = decomposed_count(b, decomposition, clamp=False)
                for part, v in decomposition.fn(logits, b, model).items():
                    _add(sums, f"elicit/part/{part}/logp_{tag}", -(v * var).sum(), count)
            del logits, lp
        for key, (num, den) in sums.items():
            out[key] = (num / den.clamp(min=1)).item()
    names = list(batch_context.traits) + ([f"part/{p}" for p in decomposition.parts] if decomposition is not None else [])
    for name in names:
        out[f"elicit/{name}/gain"] = out[f"elicit/{name}/logp_context"] - out[f"elicit/{name}/logp_none"]
    return out


@contextmanager
def no_hooks_left(model):
    """Assert that a block leaves no forward hooks behind on any module (for tests)."""
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    yield
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    if after != before:
        raise AssertionError(f"{after - before} hooks left on the model")


@torch.no_grad()
def no_prompt_leak(model, setting, inputs: tuple[Tensor, Tensor]) -> dict[str, float]:
    """The traits' no-prompt expression during training, without generating: at the first answer token of
    the held-out questions with no prompt (`inputs` = `setting.answer_start(None)`), the mean trait log-odds
    (`leak/<trait>/log_odds`, `Setting.first_token_log_odds`) and, where the setting has it, the mean
    P(marked value) (`leak/<trait>/p`, `first_token_share`). The model is put in eval mode for the forward."""
    from inoc_mech.mechanism.context import answer_logp

    was = model.training
    model.eval()
    logp = answer_logp(model, *inputs)
    model.train(was)
    out = {f"leak/{t}/log_odds": setting.first_token_log_odds(logp, t).mean().item() for t in setting.traits}
    share = getattr(setting, "first_token_share", None)
    if share is not None:
        out.update({f"leak/{t}/p": share(logp, t).mean().item() for t in setting.traits})
    return out
