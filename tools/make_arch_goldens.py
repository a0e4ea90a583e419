#!/usr/bin/env python3
"""Random-weight tiny Qwen2 / Mistral / Llama-YaRN checkpoints and transformers logits for Scout's tests.

  python3 tools/make_arch_goldens.py OUTDIR [--seed 0]

Writes OUTDIR/<name>/{config.json, model.safetensors, golden.json} for each model below (float32 weights,
saved by transformers' own save_pretrained, so config.json carries exactly the fields this transformers
version writes). golden.json holds the prompt ids, the float32 logits of one forward pass over the whole
prompt with attn_implementation="eager" (flat, row-major [T, vocab]), the model's RoPE inverse frequencies
and attention scaling, and for llama_yarn a list of RoPE cases (config.json text, inv_freq,
attention_scaling) that Scout's RoPE must reproduce. CPU only; no network; takes seconds.
"""
import argparse, json, math, os, re, shutil, sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import transformers
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

TV = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
V5 = TV >= (5, 0)
DTYPE_KW = "dtype" if TV >= (4, 56) else "torch_dtype"


def rope_kwargs(theta, scaling=None):
    """RoPE settings in the form this transformers version takes (rope_parameters in 5, rope_scaling in 4)."""
    if V5:
        rp = {"rope_type": "default"} if scaling is None else dict(scaling)
        rp["rope_theta"] = theta
        return {"rope_parameters": rp}
    return {"rope_theta": theta, "rope_scaling": None if scaling is None else dict(scaling)}


COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2, max_position_embeddings=512)

# name -> (config class, model class, config kwargs, prompt length)
MODELS = {
    # Qwen2: q/k/v biases (implicit in the architecture), no sliding window (as Qwen2.5 ships).
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              dict(COMMON, vocab_size=300, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   tie_word_embeddings=False, use_sliding_window=False, **rope_kwargs(1e6)), 100),
    # Qwen2 with its sliding window on for layers >= max_window_layers, tied embeddings.
    "qwen2_swa": (Qwen2Config, Qwen2ForCausalLM,
                  dict(COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                       tie_word_embeddings=True, use_sliding_window=True, sliding_window=20,
                       max_window_layers=1, **rope_kwargs(1e6)), 100),
    # Mistral: sliding window on every layer, explicit head_dim != hidden / heads.
    "mistral": (MistralConfig, MistralForCausalLM,
                dict(COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     tie_word_embeddings=False, sliding_window=24, **rope_kwargs(1e4)), 100),
    # Llama with YaRN (positions far past original_max_position_embeddings) and attention_bias (q/k/v/o).
    "llama_yarn": (LlamaConfig, LlamaForCausalLM,
                   dict(COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                        tie_word_embeddings=False, attention_bias=True, mlp_bias=False,
                        **rope_kwargs(1e4, {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 64})), 128),
}

# RoPE-only cases: (max_position_embeddings, head_dim, theta, scaling). Checked against LlamaRotaryEmbedding.
ROPE_CASES = [
    (512, 16, 1e4, None),
    (512, 16, 1e4, {"rope_type": "linear", "factor": 2.0}),
    (512, 16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    (512, 16, 1e4, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                    "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}),
    (256, 32, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                    "mscale": 1.0, "mscale_all_dim": 0.5}),
    (256, 32, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                    "attention_factor": 1.25}),
    (256, 32, 1e4, {"rope_type": "yarn", "factor": 2.0}),  # original_max_position_embeddings omitted
    # Qwen2.5-style (max_position_embeddings equal to the original length) and DeepSeek-style mscale.
    (32768, 128, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    (163840, 64, 1e4, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                       "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    (131072, 128, 5e5, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}),
]


def floats(xs, digits=8):
    return "[" + ",".join(format(float(x), f".{digits}g") for x in xs) + "]"


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # large enough that a dropped bias shows
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def load(path, dtype):
    kw = {DTYPE_KW: dtype, "attn_implementation": "eager"}
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def rope_of(model):
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rot is None:
        return None
    return {"inv_freq": [float(x) for x in rot.inv_freq.float().tolist()],
            "attention_scaling": float(getattr(rot, "attention_scaling", 1.0))}


def make_model(outdir, name, cfg_cls, model_cls, kw, prompt_len, seed):
    path = os.path.join(outdir, name)
    shutil.rmtree(path, ignore_errors=True)
    cfg = cfg_cls(**kw)
    cfg.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    init_weights(model, seed)
    try:
        model.save_pretrained(path, safe_serialization=True)
    except TypeError:  # transformers versions that always write safetensors
        model.save_pretrained(path)
    for extra in os.listdir(path):  # keep the folder to what Scout reads
        if extra not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(path, extra))

    vocab = cfg.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed + 1))
    m32 = load(path, torch.float32)
    with torch.no_grad():
        logits = m32(input_ids=ids).logits[0].float()
    info = {"name": name, "model_class": model_cls.__name__, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "attn_implementation": "eager", "dtype": "float32",
            "seed": seed, "input_ids": ids[0].tolist(), "logits_shape": list(logits.shape)}
    # Diagnostics: float64 rerun (how much float32 rounding is in the golden), and for sliding-window models
    # how much the window changes the logits (so a test that passes is known to exercise it).
    try:
        m64 = load(path, torch.float64)
        with torch.no_grad():
            l64 = m64(input_ids=ids).logits[0]
        info["fp32_vs_fp64_rel_l2"] = float((logits.double() - l64).norm() / l64.norm())
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        info["fp32_vs_fp64_rel_l2"] = f"failed: {e!r}"
    info["rope"] = rope_of(m32)
    info["layer_types"] = list(getattr(m32.config, "layer_types", None) or []) or None
    info["config_sliding_window"] = getattr(m32.config, "sliding_window", None)
    if getattr(cfg, "sliding_window", None):
        try:
            m32.config.sliding_window = None
            if hasattr(m32.config, "layer_types") and m32.config.layer_types is not None:
                m32.config.layer_types = ["full_attention"] * len(m32.config.layer_types)
            for layer in m32.model.layers:
                if hasattr(layer, "attention_type"):
                    layer.attention_type = "full_attention"
                if hasattr(layer.self_attn, "sliding_window"):
                    layer.self_attn.sliding_window = None
            if hasattr(m32.model, "has_sliding_layers"):
                m32.model.has_sliding_layers = False
            with torch.no_grad():
                lfull = m32(input_ids=ids).logits[0].float()
            info["no_window_rel_l2_change"] = float((lfull - logits).norm() / logits.norm())
        except Exception as e:  # noqa: BLE001
            info["no_window_rel_l2_change"] = f"failed: {e!r}"
    if name == "llama_yarn":
        info["rope_cases"] = rope_cases()

    body = json.dumps(info, indent=1)
    body = body[:-2] + ',\n "logits": ' + floats(logits.reshape(-1).tolist()) + "\n}\n"
    with open(os.path.join(path, "golden.json"), "w") as f:
        f.write(body)
    json.loads(open(os.path.join(path, "golden.json")).read())  # well-formed
    sizes = {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    print(f"{name}: {sizes} fp32/fp64 {info['fp32_vs_fp64_rel_l2']}"
          f" window change {info.get('no_window_rel_l2_change')} rope scaling {info['rope'] and info['rope']['attention_scaling']}",
          flush=True)


def rope_cases():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    out = []
    for max_pos, head_dim, theta, scaling in ROPE_CASES:
        case = {"max_position_embeddings": max_pos, "head_dim": head_dim, "rope_theta": theta, "scaling": scaling}
        try:
            cfg = LlamaConfig(vocab_size=256, hidden_size=head_dim * 4, intermediate_size=96, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
                              max_position_embeddings=max_pos, **rope_kwargs(theta, scaling))
            cfg.architectures = ["LlamaForCausalLM"]
            rot = LlamaRotaryEmbedding(config=cfg)
            case["config_json"] = cfg.to_json_string(use_diff=False)
            case["inv_freq"] = [float(x) for x in rot.inv_freq.float().tolist()]
            case["attention_scaling"] = float(rot.attention_scaling)
        except Exception as e:  # noqa: BLE001 - recorded, the C++ test skips it
            case["error"] = repr(e)
        out.append(case)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    names = [n for n in MODELS if not args.only or n in args.only.split(",")]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    failed = []
    for i, name in enumerate(names):
        cfg_cls, model_cls, kw, prompt_len = MODELS[name]
        try:
            make_model(args.outdir, name, cfg_cls, model_cls, kw, prompt_len, args.seed + 100 * i)
        except Exception as e:  # noqa: BLE001 - make the others, report this one
            import traceback
            traceback.print_exc()
            failed.append(name)
            print(f"{name}: FAILED {e!r}", flush=True)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.outdir) for f in fs)
    print(f"total {total} bytes in {args.outdir}; failed: {failed or 'none'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
