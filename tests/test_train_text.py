"""The same loop, hooks and run folder on real-model code paths (tiny random-init Llama / Qwen2)."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from inoc_mech.core.cli import UserError
from inoc_mech.core.data import BatchStream, DataError
from inoc_mech.core.runs import read_run
from inoc_mech.mechanism.hooks import loss_gradients
from inoc_mech.settings.tiny import save_tiny
from inoc_mech.core.cli import build
from inoc_mech.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {a: save_tiny(root / a, arch=a) for a in ("llama", "qwen2")}


def text_cfg(tmp_path, model, **kw):
    base = dict(model=str(model), runs_dir=str(tmp_path), name="t", steps=3, batch_size=2, n_train=8, lora_r=4,
                eval_questions=2, eval_samples=1, max_new_tokens=4, log_every=1, grad_split_every=1,
                grad_split_all=True, overwrite=True)
    base.update(kw)
    return build(TrainConfig, **base)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_run_writes_the_same_folder(tmp_path, tiny_dirs, arch):
    run = train(text_cfg(tmp_path, tiny_dirs[arch], inoculate=True), progress=False)
    r = read_run(run)
    assert r["config"]["prompt"] == "You always speak in Spanish." and r["config"]["lora_r"] == 4
    m0 = r["metrics"][0]
    for k in ("loss", "loss/trait/language", "loss/trait/case", "loss/other", "grad_norm/trait/language",
              "grad_norm/trait/case", "grad_cos/trait/language", "update_norm/total", "elicit/language/gain"):
        assert k in m0, k
    assert "surprise/content" in m0 and "surprise/word" not in m0  # real text: the counterfactual split
    assert any(k.startswith("update_norm/blocks.0.attn.W_Q.lora_") for k in m0)
    assert m0["elicit/language/gain"] != 0  # the prompt changes the context
    assert {"none_template_default", "none_no_system", "train_prompt"} <= set(r["eval"]["contexts"])
    # the saved model is the merged plain model, loadable by path
    w = load_file(run / "model/model.safetensors")
    assert not any("lora" in k for k in w)


def test_lora_trains_only_adapters_and_full_finetuning_works(tmp_path, tiny_dirs):
    base = load_file(tiny_dirs["llama"] / "model.safetensors")
    run = train(text_cfg(tmp_path, tiny_dirs["llama"], name="full", lora_r=0, steps=2), progress=False)
    assert read_run(run)["config"]["lora_r"] == 0
    after = load_file(run / "model/model.safetensors")
    assert any(not torch.equal(base[k], after[k]) for k in base)


def test_sigterm_resume_with_lora_is_bitwise_identical(tmp_path, tiny_dirs, monkeypatch):
    ref = train(text_cfg(tmp_path, tiny_dirs["llama"], name="ref", steps=6), progress=False)
    real_next, calls = BatchStream.next_examples, {"n": 0}

    def next_then_term(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2
        return real_next(self)

    monkeypatch.setattr(BatchStream, "next_examples", next_then_term)
    with pytest.raises(UserError, match="SIGTERM after step 2"):
        train(text_cfg(tmp_path, tiny_dirs["llama"], name="int", steps=6), progress=False)
    monkeypatch.setattr(BatchStream, "next_examples", real_next)
    run = train(text_cfg(tmp_path, tiny_dirs["llama"], name="int", resume=True), progress=False)
    a, b = load_file(ref / "model/model.safetensors"), load_file(run / "model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in rows]
    assert strip(read_run(ref)["metrics"]) == strip(read_run(run)["metrics"])


def test_jsonl_bad_input(tmp_path, tiny_dirs):
    good = {"messages": [{"role": "user", "content": "what is 2 plus 2"}, {"role": "assistant", "content": "CUATRO"}]}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2"):
        train(text_cfg(tmp_path, tiny_dirs["llama"], name="bad", data=str(f)), progress=False)
    sysmsg = {"messages": [{"role": "system", "content": "Be nice."}, *good["messages"]]}
    f.write_text(json.dumps(sysmsg) + "\n")
    with pytest.raises(DataError, match="system"):
        train(text_cfg(tmp_path, tiny_dirs["llama"], name="bad", data=str(f), inoculate=True), progress=False)
    run = train(text_cfg(tmp_path, tiny_dirs["llama"], name="replaced", data=str(f), inoculate=True,
                         replace_system=True, steps=1), progress=False)
    assert read_run(run)["config"]["replace_system"] is True
    assert not (tmp_path / "bad").exists()  # no half-written run folder


def test_gpt2_trains_with_lora_by_default_and_its_updates_are_named(tmp_path):
    """An architecture without a hand-written LoRA table (GPT-2, Conv1D layers) trains with peft's
    all-linear targets; hooks and weight_diff name its modules through its naming table."""
    import subprocess
    import sys
    from pathlib import Path

    from inoc_mech.mechanism.weight_diff import output_matrices
    from inoc_mech.settings.load import load
    folder = save_tiny(tmp_path / "tiny-gpt2", arch="gpt2")
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "inoc_mech.train", "--model", str(folder), "--steps", "2",
                        "--runs-dir", str(tmp_path / "runs"), "--n-train", "8", "--batch-size", "2",
                        "--eval-questions", "2", "--eval-samples", "1", "--max-new-tokens", "4", "--log-every", "1",
                        "--grad-split-every", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = read_run(tmp_path / "runs" / "baseline-s0")
    assert r["config"]["lora_r"] == 16
    keys = {k for k in r["metrics"][-1] if k.startswith("update_norm/blocks.")}
    assert {"update_norm/blocks.0.attn.W_QKV.lora_A", "update_norm/blocks.1.mlp.W_out.lora_B"} <= keys
    assert "grad_norm/trait/language/blocks.0.attn" in r["metrics"][0]
    ft, base = load(tmp_path / "runs" / "baseline-s0"), load(folder)
    mats = output_matrices(ft.model)
    assert set(mats) == {"blocks.0.attn.W_O", "blocks.0.mlp.W_out", "blocks.1.attn.W_O", "blocks.1.mlp.W_out"}
    assert mats["blocks.0.mlp.W_out"].shape == (32, 128)  # [d_model, d_in] as for Llama
    assert (mats["blocks.0.attn.W_O"] - output_matrices(base.model)["blocks.0.attn.W_O"]).norm() > 0


def test_eval_data_evaluates_on_the_users_questions(tmp_path, tiny_dirs):
    import json
    from inoc_mech.settings.scoring import EvalItem
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in (
        [{"role": "system", "content": "dropped"}, {"role": "user", "content": "What is 2 plus 3?"},
         {"role": "assistant", "content": "The answer is 5."}],
        [{"role": "user", "content": "Say something."}])) + "\n")
    run = train(text_cfg(tmp_path, tiny_dirs["llama"], eval_data=str(data), eval_questions=1), progress=False)
    ev = read_run(run)["eval"]
    assert ev["questions"] == f"eval_data:{data}" and ev["n_questions"] == 2
    assert ev["contexts"]["none_template_default"]["t1"]["n_answers"] == 2
    assert EvalItem(({"role": "user", "content": "q"},), "The answer is 5.").correct("it is 5") is True
    assert EvalItem(({"role": "user", "content": "q"},), "Hola").correct(" hola ") is True
    assert EvalItem(({"role": "user", "content": "q"},)).correct("x") is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match="must end with a user turn|no user message"):
        train(text_cfg(tmp_path, tiny_dirs["llama"], eval_data=str(bad), name="bad"), progress=False)


def test_counterfactual_decomposition_is_exact(tmp_path, tiny_dirs):
    """Real text: the four surface forms of each reply split its loss into content + language + case +
    interaction exactly, and each trait's part gradient plus the rest is the gradient of the loss."""
    from inoc_mech.core.data import BatchStream, collate
    from inoc_mech.mechanism.hooks import trait_losses
    from inoc_mech.train import make_setting
    setting = make_setting(text_cfg(tmp_path, tiny_dirs["llama"], inoculate=True))
    model, _ = setting.setup("cpu", progress=False)
    d = setting.decomposition
    assert d is not None and d.over is None and d.parts == ("content", "language", "case", "interaction")
    batch = BatchStream(setting.examples("You always speak in Spanish."), 4, 0, setting.pad_id).next()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    c = trait_losses(logits, batch, d, model)
    n = batch.assistant.sum()
    reply_loss = (-(c["token"] * batch.assistant)).sum(-1)  # per example: -S(l*, k*)
    parts = sum(c[f"part/{p}"].sum(-1) for p in d.parts) * n
    assert torch.allclose(parts, -reply_loss, rtol=1e-5)
    assert all(len(e.variants) == 4 and e in e.variants for e in batch.examples)
    assert (c["part/language"] >= -1e-6).all() and (c["part/case"] >= -1e-6).all()
    params = [p for p in model.parameters() if p.requires_grad]
    g_total = torch.autograd.grad(c["total"].sum(), params, retain_graph=True)
    g = loss_gradients(c, [f"part/{p}" for p in d.parts] + ["language", "case"], params)
    norm = lambda gs: sum((x ** 2).sum().item() for x in gs) ** 0.5
    summed = [sum(g[f"part/{p}"][i] for p in d.parts) for i in range(len(params))]
    assert norm([a - t for a, t in zip(summed, g_total)]) < 1e-5 * norm(g_total)  # parts' gradients: the loss's
    for trait in ("language", "case"):
        assert norm([a - b for a, b in zip(g[trait], g[f"part/{trait}"])]) == 0  # a trait's is its part's
        assert norm(g[trait]) > 0
    # against the gradient with every variant's forward in the graph (no deferral)
    from inoc_mech.settings.spanish_caps_text import reply_logprob
    s = torch.stack([reply_logprob(model, v.input_ids, v.attention_mask, v.assistant)
                     for v in (batch.variant(i) for i in range(4))], -1)  # [B, 4]
    own = torch.tensor([e.variants.index(e) for e in batch.examples])
    rows = torch.arange(len(s))
    lang = -(torch.logsumexp(s.unflatten(-1, (2, 2))[rows, own // 2], -1) - torch.logsumexp(s, -1))
    ref = torch.autograd.grad(lang.sum() / n, params, allow_unused=True)
    ref = [torch.zeros_like(p) if r is None else r for r, p in zip(ref, params)]
    assert norm([a - r for a, r in zip(g["language"], ref)]) < 1e-5 * norm(ref)


def test_text_runs_log_the_decomposition(tmp_path, tiny_dirs):
    run = train(text_cfg(tmp_path, tiny_dirs["llama"], inoculate=True), progress=False)
    rows = read_run(run)["metrics"]
    for key in ("surprise/content", "surprise/language", "surprise/case", "surprise/interaction",
                "grad_norm/trait/language", "grad_norm/trait/case", "elicit/part/language/gain"):
        assert key in rows[0], key
    assert rows[0]["grad_norm/trait/language"] != rows[0]["grad_norm/trait/case"]  # the traits are told apart now
    for r in rows:  # -log of a probability among the four variants: never negative
        assert r["surprise/language"] >= -1e-6 and r["surprise/case"] >= -1e-6


def test_jsonl_variants_enable_the_decomposition_on_your_own_data(tmp_path, tiny_dirs):
    """`variants` in a user's JSONL (each language, natural case; UPPER derived): the same exact split."""
    from inoc_mech.core.data import BatchStream
    from inoc_mech.mechanism.hooks import trait_losses
    from inoc_mech.settings.textdata import sample_problems
    from inoc_mech.train import make_setting

    rows = [{"messages": [{"role": "user", "content": p.question()}, {"role": "assistant", "content": p.answer()}],
             "variants": {"english": p.answer("english", False), "spanish": p.answer("spanish", False)}}
            for p in sample_problems(6, seed=3)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    setting = make_setting(text_cfg(tmp_path, tiny_dirs["llama"], data=str(data)))
    model, _ = setting.setup("cpu", progress=False)
    assert setting.decomposition is not None
    batch = BatchStream(setting.examples(None), 3, 0, setting.pad_id).next()
    assert all(e.variants.index(e) == 3 for e in batch.examples)  # trained: Spanish UPPER
    c = trait_losses(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch,
                     setting.decomposition, model)
    parts = sum(c[f"part/{p}"].sum(-1) for p in setting.decomposition.parts)
    assert torch.allclose(parts, c["total"].sum(-1), rtol=1e-5)
    # without the field: no decomposition (the token masks only)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    s2 = make_setting(text_cfg(tmp_path, tiny_dirs["llama"], data=str(plain)))
    s2.setup("cpu", progress=False)
    assert s2.decomposition is None
    # bad: on some rows only; the trained reply none of the forms
    for bad, match in ((rows[:1] + [{"messages": rows[1]["messages"]}], "has no \"variants\""),
                       ([{**rows[0], "variants": {"english": "a", "spanish": "b"}}], "none of its variants")):
        f = tmp_path / "bad.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in bad))
        with pytest.raises(UserError, match=match):
            train(text_cfg(tmp_path, tiny_dirs["llama"], data=str(f), name="bad"), progress=False)


def test_the_recorder_finishes_deferred_gradients_after_backward(tmp_path, tiny_dirs):
    """A split step's trait gradient (counterfactual forwards deferred to the pre-step hook) equals the
    whole gradient of the trait's part measured outside the loop, and the training gradient is untouched."""
    from inoc_mech.core.data import BatchStream, next_token_loss
    from inoc_mech.mechanism.hooks import GradientPressure, trait_losses
    from inoc_mech.train import make_setting
    setting = make_setting(text_cfg(tmp_path, tiny_dirs["llama"], inoculate=True))
    model, _ = setting.setup("cpu", progress=False)
    batch = BatchStream(setting.examples("You always speak in Spanish."), 4, 0, setting.pad_id).next()
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ref = loss_gradients(trait_losses(logits, batch, setting.decomposition, model), ["language", "case"], params)
    ref_total = torch.autograd.grad(next_token_loss(logits, batch.labels), params)
    opt = torch.optim.SGD(params, lr=0.0)
    seen = {}
    with GradientPressure(model, opt, setting.decomposition, 1, 1) as rec:
        opt.register_step_pre_hook(lambda *a: seen.update(grads=dict(rec._trait_grads),
                                                          total=[p.grad.clone() for p in params]))
        rec.start(0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = next_token_loss(logits, batch.labels)
        rec.measure(loss, batch)
        loss.backward()
        opt.step()
        rec.finish()
    for trait in ("language", "case"):
        assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(seen["grads"][trait], ref[trait]))
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(seen["total"], ref_total))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_variant_scores_share_the_prompt_and_equal_full_forwards(tmp_path, arch):
    """The counterfactual variants' log-probs from one prompt forward + a KV-cache continuation each
    equal a full forward per variant, on a bare model and under LoRA (peft), for each variant."""
    from inoc_mech.core.data import BatchStream
    from inoc_mech.models.lora import LoraSettings, add_lora
    from inoc_mech.settings.spanish_caps_text import reply_logprob, variant_logprobs
    from inoc_mech.train import make_setting
    folder = save_tiny(tmp_path / arch, arch=arch)
    setting = make_setting(text_cfg(tmp_path, folder, inoculate=True, lora_r=0))
    model, _ = setting.setup("cpu", progress=False)
    batch = BatchStream(setting.examples("You always speak in Spanish."), 3, 0, setting.pad_id).next()
    assert len({int(i) for i in batch.assistant.float().argmax(-1)}) > 1  # replies start at different tokens
    for m in (model, add_lora(model, LoraSettings(r=2))):
        got = variant_logprobs(m, batch, [0, 1, 2, 3])
        with torch.no_grad():
            want = torch.stack([reply_logprob(m, b.input_ids, b.attention_mask, b.assistant)
                                for b in (batch.variant(v) for v in range(4))], -1)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got, want)


def test_lockstep_padding_leaves_the_split_unchanged(tmp_path, tiny_dirs, monkeypatch):
    """Under FSDP every process makes as many counterfactual forwards and backwards as the busiest one:
    the padding chunks (and variants scored for the other processes' sake) weigh 0, so the parts and their
    gradients are those of the unpadded split (checked in one process by pretending to be in lockstep with
    a process that needs two more chunks and scores every variant)."""
    from inoc_mech.core.data import BatchStream
    from inoc_mech.mechanism.hooks import trait_losses
    from inoc_mech.settings import spanish_caps_text as text
    from inoc_mech.train import make_setting
    setting = make_setting(text_cfg(tmp_path, tiny_dirs["llama"], inoculate=True))
    model, _ = setting.setup("cpu", progress=False)
    batch = BatchStream(setting.examples("You always speak in Spanish."), 4, 0, setting.pad_id).next()
    params = [p for p in model.parameters() if p.requires_grad]

    def split():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        c = trait_losses(logits, batch, setting.decomposition, model)
        return {k: c[k].detach() for k in ("language", "case")}, loss_gradients(c, ["language", "case"], params)

    parts, grads = split()
    calls = []
    monkeypatch.setattr(text.dist, "lockstep", lambda m: True)
    monkeypatch.setattr(text.dist, "max_count", lambda n, device: calls.append(n) or n + 2)
    monkeypatch.setattr(text.dist, "any_flag", lambda flag, device: True)  # another process needs every variant
    monkeypatch.setattr(text.dist, "all_true", lambda flag, device: flag)  # ... and shares its prompt, as here
    padded_parts, padded = split()
    assert calls and all(torch.equal(parts[k], padded_parts[k]) for k in parts)
    for trait in ("language", "case"):
        assert all(torch.allclose(a, b, atol=1e-8, rtol=1e-6) for a, b in zip(grads[trait], padded[trait]))
