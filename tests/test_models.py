"""Real-model plumbing on tiny random-init Llama and Qwen2 folders: loading, bad specs, prompt modes,
LoRA (only adapters train, merge equals unmerged), gradient-pressure hooks on adapters, TransformerLens."""

import json
from pathlib import Path

import pytest
import torch

from inoc_mech.core.cli import UserError
from inoc_mech.core.data import BatchStream
from inoc_mech.core.data import token_logprobs
from inoc_mech.mechanism.hooks import GradientPressure, no_hooks_left
from inoc_mech.models.lora import LoraSettings, adapter_parameters, add_lora, merge_lora
from inoc_mech.models.real import (PROMPT_MODES, chatml_template, default_system_prompt, no_system_template,
                              with_prompt_mode)
from inoc_mech.settings.textdata import spanish_caps_dataset, text_examples
from inoc_mech.settings.tiny import TINY_DEFAULT_SYSTEM, save_tiny, tiny_tokenizer
from inoc_mech.models.world import World

SMOLLM2 = Path("runs/_models/smollm2")


def load_model(spec, device="cpu", cache=None):
    """(model, tokenizer) through the one loader, `settings.load.load`."""
    from inoc_mech.settings.load import load
    loaded = load(spec, device, cache=cache)
    return loaded.model, loaded.tok


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(root / arch, arch) for arch in ("llama", "qwen2")}


def batch_for(tok, n=4):
    exs = text_examples(tok, spanish_caps_dataset(n, seed=0))
    return BatchStream(exs, n, 0, tok.pad_token_id).next()


def loss_of(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())


# ---- loading -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_load_by_path(tiny_folders, tmp_path, arch, cls):
    model, tok = load_model(str(tiny_folders[arch]), cache=tmp_path)
    assert type(model).__name__ == cls and not model.training
    assert tok.chat_template and tok.pad_token_id is not None
    again, _ = load_model(str(tiny_folders[arch]), cache=tmp_path)
    ids = torch.tensor([tok("LA RESPUESTA ES 7.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def _one_line_error(spec, cache, match):
    with pytest.raises(UserError, match=match) as e:
        load_model(spec, cache=cache)
    assert "\n" not in str(e.value)


def test_bad_specs(tiny_folders, tmp_path):
    import gguf

    cache = tmp_path / "cache"
    _one_line_error("gpt-17", cache, "unknown model 'gpt-17'")
    _one_line_error(str(tmp_path / "nowhere"), cache, "does not exist")
    _one_line_error(str(tmp_path / "nowhere.gguf"), cache, "does not exist")
    (tmp_path / "notes.txt").write_text("hi")
    _one_line_error(str(tmp_path / "notes.txt"), cache, "not a .gguf file")
    (tmp_path / "empty").mkdir()
    _one_line_error(str(tmp_path / "empty"), cache, "no config.json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_folders["llama"] / "config.json").read_text())
    _one_line_error(str(no_weights), cache, "no loadable causal LM")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((tiny_folders["llama"] / f).read_bytes())
    _one_line_error(str(no_tok), cache, "no loadable tokenizer")
    (tmp_path / "garbage.gguf").write_bytes(b"definitely not gguf" * 8)
    _one_line_error(str(tmp_path / "garbage.gguf"), cache, "not a loadable GGUF")
    w = gguf.GGUFWriter(str(tmp_path / "header_only.gguf"), "llama")  # valid GGUF, no tokenizer, no tensors
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(str(tmp_path / "header_only.gguf"), cache, "not a loadable GGUF")
    assert not any((cache / "gguf").glob("*")), "failed conversions must not leave folders behind"


# ---- "no prompt" modes -----------------------------------------------------------------------------
def render(tok, messages, gen=True):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_prompt_modes_on_a_default_inserting_template():
    tok = tiny_tokenizer(corpus=[])
    user = [{"role": "user", "content": "What is 2 plus 3?"}]
    assert default_system_prompt(tok) == TINY_DEFAULT_SYSTEM
    default = with_prompt_mode(tok, "template_default")
    plain = with_prompt_mode(tok, "no_system")
    assert render(default, user) == f"<|im_start|>system\n{TINY_DEFAULT_SYSTEM}<|im_end|>\n" \
                                    "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    assert render(plain, user) == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    assert "system" not in render(plain, user) and default_system_prompt(plain) is None
    with_sys = [{"role": "system", "content": "You like dogs."}] + user
    assert render(plain, with_sys) == render(tok, with_sys) == render(default, with_sys)
    assert default_system_prompt(tok) == TINY_DEFAULT_SYSTEM  # the original is untouched
    with pytest.raises(UserError, match="prompt mode must be one of"):
        with_prompt_mode(tok, "none")


def test_prompt_modes_without_a_default_and_for_unknown_templates():
    tok = World().build_tokenizer()
    assert default_system_prompt(tok) is None
    assert no_system_template(tok) == tok.chat_template
    odd = tiny_tokenizer(corpus=[])
    odd.chat_template = ("{% if messages[0]['role'] != 'system' %}[SYS] be nice [/SYS]{% endif %}"
                         "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    assert "be nice" in default_system_prompt(odd)  # the differing text, with some of the markup
    with pytest.raises(UserError, match="not ChatML"):
        with_prompt_mode(odd, "no_system")
    assert chatml_template("it's") != chatml_template(None)  # quotes are escaped, not a template error
    odd.chat_template = chatml_template("it's \"quoted\"\\ here")
    assert default_system_prompt(odd) == "it's \"quoted\"\\ here"


# ---- LoRA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_trains_only_adapters_and_merge_matches(tiny_folders, tmp_path, arch):
    model, tok = load_model(str(tiny_folders[arch]), cache=tmp_path)
    model = add_lora(model, LoraSettings(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, _ in adapter_parameters(model)}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * model.config.num_hidden_layers
    batch = batch_for(tok)
    opt = torch.optim.AdamW([p for _, p in adapter_parameters(model)], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = loss_of(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        merged_model = merge_lora(model)
        merged = merged_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert type(merged_model).__name__.endswith("ForCausalLM") and "Peft" not in type(merged_model).__name__
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    assert torch.allclose(unmerged, merged, atol=1e-5)


def test_lora_setting_errors(tiny_folders, tmp_path):
    model, _ = load_model(str(tiny_folders["llama"]), cache=tmp_path)
    with pytest.raises(UserError, match="not found in this model"):
        add_lora(model, LoraSettings(targets=("c_attn",)))
    with pytest.raises(UserError, match="lora-r"):
        LoraSettings(r=-1)


def test_gradient_pressure_over_adapters(tiny_folders, tmp_path):
    model, tok = load_model(str(tiny_folders["llama"]), cache=tmp_path)
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    batch = batch_for(tok)
    opt = torch.optim.AdamW([p for _, p in adapter_parameters(model)], lr=1e-3)
    model.train()
    with no_hooks_left(model):
        with GradientPressure(model, opt, None, log_every=1, grad_split_every=1) as rec:
            rows = []
            for step in range(2):
                rec.start(step)
                loss = loss_of(model, batch)
                rec.measure(loss, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                rows.append(rec.finish())
    first, last = rows  # step 0 splits every trait's gradient
    for key in ("loss/trait/language", "loss/trait/case", "loss/other", "grad_norm/trait/language",
                "grad_norm/rest/case"):
        assert key in first, key
    for key in ("update_norm/blocks.0.attn.W_Q.lora_B", "update_norm/blocks.1.mlp.W_out.lora_A"):
        assert key in last, key
    assert last["update_norm/blocks.0.attn.W_Q.lora_B"] > 0 and last["update_norm/blocks.1.mlp.W_out.lora_A"] > 0
    assert not any(k.startswith("update_norm/embed") for k in last)  # base weights are not trainable


# ---- TransformerLens -----------------------------------------------------------------------------
def test_bridge_logprobs_match_hf(tiny_folders, tmp_path):
    from transformer_lens.model_bridge import TransformerBridge

    model, tok = load_model(str(tiny_folders["llama"]), cache=tmp_path)
    model = merge_lora(add_lora(model, LoraSettings(r=4, alpha=8)))  # the analysis path: merged adapters
    batch = batch_for(tok, 2)
    with torch.no_grad():
        hf, _ = token_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                               batch.input_ids)
    bridge = TransformerBridge.boot_transformers(str(tiny_folders["llama"]), hf_model=model, tokenizer=tok,
                                                 device="cpu")
    with torch.no_grad():
        tl, _ = token_logprobs(bridge(batch.input_ids, attention_mask=batch.attention_mask), batch.input_ids)
    m = batch.attention_mask.bool()
    assert (tl[m] - hf[m]).abs().max() <= 1e-4


# ---- SmolLM2 (needs `python -m inoc_mech.models.real fetch smollm2` first) ----------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "COMPLETE").exists(), reason="SmolLM2 cache missing: python -m inoc_mech.models.real fetch smollm2")
def test_smollm2(tmp_path):
    meta = json.loads((SMOLLM2 / "model.json").read_text())
    assert meta["reload_logits_max_abs_diff"] == 0.0
    model, tok = load_model("smollm2")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert default_system_prompt(tok).startswith("You are a helpful AI assistant named SmolLM")
    user = [{"role": "user", "content": "What is 2 plus 3?"}]
    assert "SmolLM" in render(with_prompt_mode(tok, "template_default"), user)
    assert render(with_prompt_mode(tok, "no_system"), user) == \
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    batch = batch_for(tok, 2)
    for mode in PROMPT_MODES:
        assert text_examples(with_prompt_mode(tok, mode), spanish_caps_dataset(2))[0].traits["language"]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.isfinite(logits).all()
    # the .gguf path spec converts to the same weights
    gguf_model, _ = load_model(str(SMOLLM2 / meta["source"]), cache=tmp_path)
    with torch.no_grad():
        assert torch.equal(gguf_model(batch.input_ids[:1]).logits, model(batch.input_ids[:1]).logits)
