#!/usr/bin/env python3
"""Train Scout's byte-level tiny target/draft Llama fixtures and write golden files.

  python3 tools/train_fixtures.py --out DIR [--smoke] [--target-steps N] [--draft-steps N]
      [--seq-len 8192] [--batch 8] [--seed 0] [--time-budget-s 420]

Writes DIR/models/scout-tiny-{target,draft}/ (HF LlamaForCausalLM, bf16 safetensors, sharded at 8 MB,
config.json, generation_config.json, scout_tokenizer.json), DIR/models/README.md and DIR/models/goldens/.
Vocabulary: ids 0..255 are raw bytes, 256 = BOS, 257 = EOS. Needs one CUDA GPU; no network.
"""
import argparse, datetime, json, math, os, random, re, sys, sysconfig, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

BOS, EOS, VOCAB = 256, 257, 258
T0 = time.time()
TV = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
DTYPE_KW = "dtype" if TV >= (4, 56) else "torch_dtype"  # from_pretrained kwarg renamed in 4.56 / 5.x
EXTS = (".py", ".md", ".rst", ".txt", ".c", ".h", ".cpp", ".cu", ".json", ".yaml", ".toml")
SHORT_PROMPT = "def fibonacci(n):\n    "
COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None, rms_norm_eps=1e-5,
              max_position_embeddings=8192, attention_bias=False, mlp_bias=False, hidden_act="silu")
SPECS = {
    "target": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                   rope=dict(rope_type="llama3", rope_theta=500000.0, factor=4.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=2048)),
    "draft": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=3,
                  num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
                  rope=dict(rope_type="default", rope_theta=10000.0)),
}
TOKENIZER = {"type": "bytes", "bos_token_id": BOS, "eos_token_id": EOS, "vocab_size": VOCAB}


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------------------------- data
def load_corpus(seed, cap, val_min):
    """Text files of this Python installation -> (train uint8 array, val uint8 array, info dict)."""
    p = sysconfig.get_paths()
    roots = sorted({os.path.realpath(r) for r in (p["stdlib"], p["purelib"], p["platlib"], "/usr/share/doc")
                    if r and os.path.isdir(r)})
    roots = [r for r in roots if not any(r.startswith(o + os.sep) for o in roots)]  # drop nested roots
    paths = []
    for r in roots:
        for dp, _, fns in os.walk(r):
            paths += [os.path.join(dp, f) for f in fns if f.endswith(EXTS)]
    paths = sorted(set(paths))
    order = np.random.default_rng(seed).permutation(len(paths))
    chunks, total = [], 0
    for i in order:
        path = paths[i]
        if os.path.islink(path):
            continue
        try:  # narrow: only unreadable files are skipped
            if not 0 < os.path.getsize(path) <= (1 << 20):
                continue
            with open(path, "rb") as f:
                b = f.read()
        except OSError:
            continue
        if b"\x00" in b:  # binary
            continue
        chunks.append(b)
        total += len(b)
        if total >= cap:
            break
    n_val_files = max(1, math.ceil(0.01 * len(chunks)))
    k, vb = 0, 0
    while k < len(chunks) and (k < n_val_files or vb < val_min):
        vb += len(chunks[k])
        k += 1
    val = np.frombuffer(b"\n\n".join(chunks[:k]), np.uint8)
    train = np.frombuffer(b"\n\n".join(chunks[k:]), np.uint8)
    info = dict(roots=roots, candidate_files=len(paths), train_files=len(chunks) - k, val_files=k,
                train_bytes=int(train.size), val_bytes=int(val.size))
    return train, val, info


# Synthetic long-range retrieval tasks, written over a window of filler bytes (length never changes).
PK_FACT = "\nThe pass key is {0}. Remember it. {0} is the pass key.\n"
PK_QUERY = "\nWhat is the pass key? The pass key is "  # + answer + ".\n"
KV_FACT = "\nKEY {} = VALUE {}\n"                      # 27 bytes
KV_QUERY = "\nQUERY {} -> "                           # + value + "\n" = 24 bytes
HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def rand_hex(rng):
    return HEX[rng.integers(0, 16, size=6)].tobytes().decode()


def put(content, pos, b):
    content[pos:pos + len(b)] = np.frombuffer(b, np.uint8)


def insert_task(content, rng, kind):
    """Overwrite `content` (uint8, length C) in place with a task whose queries end the sequence.
    Returns (offset of the final query's answer in content, answer bytes)."""
    C = len(content)
    if kind == "passkey":
        ans = str(int(rng.integers(10000, 100000)))
        fact = PK_FACT.format(ans).encode()
        query = (PK_QUERY + ans + ".\n").encode()
        qpos = C - len(query)
        hi = min(int(0.9 * C), qpos) - len(fact)  # fact lies in the first 90% and before the query
        assert hi >= 0, f"sequence too short for passkey: {C}"
        put(content, int(rng.integers(0, hi + 1)), fact)
        put(content, qpos, query)
        return qpos + len(PK_QUERY), ans.encode()
    assert kind == "kv", kind
    n, nq = int(rng.integers(4, 17)), int(rng.integers(2, 5))
    flen = len(KV_FACT.format("x" * 6, "x" * 6))
    qpos = C - 24 * nq
    n = min(n, qpos // flen)
    assert n >= nq, f"sequence too short for kv: {C}"
    keys = []
    while len(keys) < n:
        k = rand_hex(rng)
        if k not in keys:
            keys.append(k)
    vals = [rand_hex(rng) for _ in range(n)]
    qidx = [int(i) for i in rng.choice(n, size=nq, replace=False)]
    slot = qpos // n  # one fact per equal slot, random offset inside it: spread over the whole sequence
    for i in range(n):
        put(content, i * slot + int(rng.integers(0, slot - flen + 1)), KV_FACT.format(keys[i], vals[i]).encode())
    put(content, qpos, "".join(KV_QUERY.format(keys[i]) + vals[i] + "\n" for i in qidx).encode())
    return C - 7, vals[qidx[-1]].encode()


def make_prompt(corpus, kind, seed, length):
    """Deterministic retrieval prompt: BOS + a `length`-token sequence cut right before the final answer.
    Filler is made ASCII-only so the prompt round-trips as a JSON string. Returns (ids int64, answer)."""
    rng = np.random.default_rng(seed)
    C = length - 1
    s = int(rng.integers(0, corpus.size - C))
    content = corpus[s:s + C].copy()
    content[content >= 128] = ord("?")
    off, ans = insert_task(content, rng, kind)
    ids = np.empty(off + 1, np.int64)
    ids[0], ids[1:] = BOS, content[:off]
    return ids, ans


def make_batch(train, B, L, rng):
    x = np.empty((B, L), np.int16)
    x[:, 0] = BOS
    for b in range(B):
        s = int(rng.integers(0, train.size - L))
        content = train[s:s + L - 1].copy()
        if rng.random() < 0.5:  # half of the sequences carry a retrieval task
            insert_task(content, rng, "passkey" if rng.random() < 0.5 else "kv")
        x[b, 1:] = content
    return torch.from_numpy(x).to("cuda", non_blocking=True).long()


# ---------------------------------------------------------------------------------------------- model
def rope_of(d):
    """Normalized rope dict from a config dict, transformers 5 (rope_parameters) or 4 (rope_theta/rope_scaling)."""
    if d.get("rope_parameters"):
        rp = dict(d["rope_parameters"])
    else:
        rp = dict(d.get("rope_scaling") or {})
        rp["rope_theta"] = d.get("rope_theta")
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def make_config(spec):
    kw = {k: v for k, v in spec.items() if k != "rope"}
    kw.update(COMMON)
    rope = spec["rope"]
    if hasattr(LlamaConfig(), "rope_parameters"):  # transformers >= 5
        cfg = LlamaConfig(**kw, rope_parameters=dict(rope))
    else:
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg = LlamaConfig(**kw, rope_theta=rope["rope_theta"],
                          rope_scaling=None if rope["rope_type"] == "default" else scaling)
    d = cfg.to_dict()
    print(json.dumps(d, sort_keys=True, default=str), flush=True)
    got = rope_of(d)
    for k, v in list(kw.items()) + list(rope.items()):
        assert (got if k in rope else d).get(k) == v, f"config mismatch {k}: {v} vs {d}"
    return cfg


def expected_inv_freq(rope, head_dim):
    inv = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope["rope_type"] == "default":
        return inv
    f, lo, hi, old = (rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv
    inv_l = np.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(medium, (1 - smooth) * inv_l / f + smooth * inv_l, inv_l)


def check_rope(model, spec):
    """Independent check that transformers built the RoPE frequencies we asked for."""
    rot = model.model.rotary_emb
    got = rot.inv_freq.detach().double().cpu().numpy()
    exp = expected_inv_freq(spec["rope"], spec["head_dim"])
    err = float(np.max(np.abs(got - exp) / exp))
    assert err < 1e-5 and float(getattr(rot, "attention_scaling", 1.0)) == 1.0, (err, got, exp)
    print(f"  rope inv_freq ok (max rel err {err:.2e}, buffer dtype {rot.inv_freq.dtype})", flush=True)


def load_model(d, dtype, attn):
    m = LlamaForCausalLM.from_pretrained(d, attn_implementation=attn, **{DTYPE_KW: dtype})
    assert next(m.parameters()).dtype == dtype
    return m.eval()


def lr_at(step, total, warmup, peak):
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * prog)))  # cosine from peak to 10%


def train(model, name, steps, lr, budget_s, data, B, L, rng, log_every):
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=True)
    warmup = min(100, max(1, steps // 10))
    # Time steps m0..m1, then shrink the schedule so it completes within the budget (hard stop as backup).
    m0, m1 = (10, 50) if steps >= 100 else (max(1, steps // 3), max(2, 2 * steps // 3))
    planned, step, t_m0 = steps, 0, None
    loss_acc, n_acc = torch.zeros((), device="cuda"), 0
    t0 = time.time()
    while step < planned:
        if time.time() - t0 > budget_s:
            log(f"[{name}] time budget {budget_s:.0f}s reached: stopping at step {step}/{planned}")
            break
        lr_now = lr_at(step, planned, warmup, lr)
        for g in opt.param_groups:
            g["lr"] = lr_now
        x = make_batch(data, B, L, rng)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_acc += loss.detach().float()
        n_acc += 1
        step += 1
        if step == m0:
            torch.cuda.synchronize()
            t_m0 = time.time()
        if step == m1 and t_m0 is not None:
            torch.cuda.synchronize()
            per = (time.time() - t_m0) / (m1 - m0)
            fit = m1 + int((budget_s - (time.time() - t0)) * 0.97 / per)
            log(f"[{name}] {per * 1e3:.1f} ms/step; {fit} steps fit the {budget_s:.0f}s budget")
            if fit < planned:
                planned = max(fit, m1)
                log(f"[{name}] schedule shortened to {planned} steps")
        if step % log_every == 0 or step == planned:
            l = loss_acc.item() / n_acc
            log(f"[{name}] step {step}/{planned} loss {l:.4f} ({l / math.log(2):.3f} bits/byte) "
                f"lr {lr_now:.2e} gnorm {gnorm.item():.2f} train {time.time() - t0:.0f}s")
            loss_acc.zero_()
            n_acc = 0
    torch.cuda.synchronize()
    del opt
    return step, time.time() - t0


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def greedy(model, ids, n_new):
    """Greedy-decode exactly n_new tokens after ids [B, T] using the HF KV cache (no EOS stop).
    Returns (tokens [B, n_new], prompt logits [B, T, V])."""
    out = model(input_ids=ids, use_cache=True)
    prompt_logits, pkv = out.logits, out.past_key_values
    nxt = prompt_logits[:, -1, :].argmax(-1, keepdim=True)
    toks = [nxt]
    for _ in range(n_new - 1):
        out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        toks.append(nxt)
    return torch.cat(toks, 1), prompt_logits


@torch.no_grad()
def eval_bpb(model, val, L, n, B, seed):
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, val.size - L, size=n)
    tot = 0.0
    for c in range(0, n, B):
        x = np.empty((len(starts[c:c + B]), L), np.int64)
        x[:, 0] = BOS
        for j, s in enumerate(starts[c:c + B]):
            x[j, 1:] = val[s:s + L - 1]
        xt = torch.from_numpy(x).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tot += model(input_ids=xt, labels=xt, use_cache=False).loss.float().item() * len(x)
    return tot / n / math.log(2)


@torch.no_grad()
def eval_retrieval(model, val, length, n, kind, seed_base):
    prompts = [make_prompt(val, kind, seed_base + i, length) for i in range(n)]
    groups = {}
    for ids, ans in prompts:  # prefixes of one kind/length have equal lengths, but group to be safe
        groups.setdefault(len(ids), []).append((ids, ans))
    correct, sample = 0, None
    for items in groups.values():
        for c in range(0, len(items), 8):
            chunk = items[c:c + 8]
            x = torch.from_numpy(np.stack([i for i, _ in chunk])).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                toks, _ = greedy(model, x, len(chunk[0][1]))
            for row, (_, ans) in zip(toks.tolist(), chunk):
                pred = bytes(t if t < 256 else 0 for t in row)
                correct += pred == ans
                sample = sample or (ans, pred)
    return correct, sample


def evaluate(model, val, args, name):
    model.eval()
    res = {"bpb": eval_bpb(model, val, args.seq_len, 2 if args.smoke else 16, args.batch, args.seed + 7)}
    log(f"[{name}] held-out {res['bpb']:.4f} bits/byte")
    lens = [(args.seq_len, 2 if args.smoke else 32), (max(512, args.seq_len // 4), 2 if args.smoke else 16)]
    for li, (L, n) in enumerate(lens):
        for kind in ("passkey", "kv"):
            c, sample = eval_retrieval(model, val, L, n, kind, 10**6 * (1 + li) + (0 if kind == "passkey" else 10**5))
            res[f"{kind}@{L}"] = (c, n)
            log(f"[{name}] {kind}@{L}: {c}/{n} exact (e.g. want {sample[0]!r} got {sample[1]!r})")
    return res


def dir_size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


# ---------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--target-steps", type=int)
    ap.add_argument("--draft-steps", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-s", type=float, default=420.0, help="training time for both models")
    args = ap.parse_args()
    sm = args.smoke
    args.target_steps = args.target_steps or (3 if sm else 1800)
    args.draft_steps = args.draft_steps or (3 if sm else 3000)
    args.seq_len = args.seq_len or (1024 if sm else 8192)
    args.batch = args.batch or (2 if sm else 8)
    assert 1024 <= args.seq_len <= COMMON["max_position_embeddings"], args.seq_len
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = torch.cuda.get_device_name()
    log(f"torch {torch.__version__} transformers {transformers.__version__} on {gpu}; args {vars(args)}")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    train_data, val, dinfo = load_corpus(args.seed, (2 if sm else 200) << 20, (512 << 10) if sm else (1 << 20))
    log(f"data: {dinfo}")
    assert train_data.size > 4 * args.seq_len and val.size > 4 * args.seq_len
    mdir = os.path.join(args.out, "models")
    gdir = os.path.join(mdir, "goldens")
    os.makedirs(gdir, exist_ok=True)

    results, used = {}, 0.0
    for mi, (name, steps, lr) in enumerate((("target", args.target_steps, 2e-3), ("draft", args.draft_steps, 3e-3))):
        spec = SPECS[name]
        cfg = make_config(spec)
        torch.manual_seed(args.seed + mi)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        assert isinstance(model, LlamaForCausalLM), type(model)
        model = model.to(device="cuda", dtype=torch.float32)
        tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert tied == spec["tie_word_embeddings"], (name, tied)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[{name}] {n_params:,} parameters, attn={model.config._attn_implementation}, tied={tied}")
        check_rope(model, spec)
        budget = args.time_budget_s * 0.6 if name == "target" else args.time_budget_s - used  # draft >= 40%
        done, secs = train(model, name, steps, lr, budget, train_data, args.batch, args.seq_len,
                           np.random.default_rng([args.seed, mi + 1]), 1 if sm else 100)
        used += secs
        log(f"[{name}] trained {done} steps in {secs:.1f}s")

        out_dir = os.path.join(mdir, f"scout-tiny-{name}")
        model.to(torch.bfloat16)
        model.save_pretrained(out_dir, max_shard_size="8MB")
        if not os.path.exists(os.path.join(out_dir, "generation_config.json")):
            model.generation_config.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "scout_tokenizer.json"), "w") as f:
            json.dump(TOKENIZER, f, indent=2)
        files = sorted(os.listdir(out_dir))
        log(f"[{name}] saved {out_dir}: {files} ({dir_size(out_dir):,} bytes)")
        if name == "target":
            assert "model.safetensors.index.json" in files, "target should be sharded"
        with open(os.path.join(out_dir, "config.json")) as f:
            print(f.read(), flush=True)
        del model
        torch.cuda.empty_cache()

        # Evaluate exactly what was shipped: the saved bf16 checkpoint, reloaded by transformers.
        model = load_model(out_dir, torch.bfloat16, "sdpa").to("cuda")
        check_rope(model, spec)
        res = evaluate(model, val, args, name)
        res.update(params=n_params, steps=done, requested_steps=steps, train_s=secs, dir=out_dir,
                   disk=dir_size(out_dir), files=files, rope=rope_of(model.config.to_dict()))
        results[name] = res
        del model
        torch.cuda.empty_cache()

    # ---- goldens: float64 on CPU from the saved checkpoints
    torch.set_num_threads(16)
    long_len = 1200 if sm else 4600
    long_ids, long_ans = make_prompt(val, "kv", 1234, long_len)
    long_str = long_ids[1:].astype(np.uint8).tobytes().decode("ascii")
    assert long_str.endswith(" -> ") and (sm or len(long_ids) >= 4500)
    short_ids = torch.tensor([BOS] + list(SHORT_PROMPT.encode()), dtype=torch.int64)
    long_t = torch.from_numpy(long_ids)
    T2 = len(long_ids)
    pos = torch.tensor(sorted(set(range(0, T2, 64)) | set(range(T2 - 16, T2))), dtype=torch.int64)
    note = (f"Computed with transformers {transformers.__version__} / torch {torch.__version__} on CPU: "
            "LlamaForCausalLM.from_pretrained(<saved bf16 checkpoint>, dtype=float64, attn_implementation='eager'), "
            "weights upcast exactly to float64. Math is float64 except where transformers' Llama code forces float32: "
            "RoPE angles (float32 inv_freq x float32 position, then cos/sin cast to float64), the RMSNorm "
            "normalization (x * rsqrt(mean(x^2) + eps) in float32, then cast back before the weight multiply) and "
            "the eager attention softmax, so goldens carry ~1e-7 relative float32 rounding there. Logits stored as "
            "float32. ids = [BOS=256] + prompt bytes. long_logits = logits at long_positions. greedy_*: exactly 64 "
            "argmax tokens after the prompt using the HF KV cache (no EOS stop).")
    with open(os.path.join(gdir, "prompts.json"), "w") as f:
        json.dump({"short": SHORT_PROMPT, "long": long_str, "long_kind": "kv", "long_seed": 1234,
                   "long_target_length": long_len, "long_expected_answer": long_ans.decode(),
                   "bos_token_id": BOS, "eos_token_id": EOS, "note": note}, f, indent=1)
    for name in ("target", "draft"):
        d = results[name]["dir"]
        m = load_model(d, torch.float64, "eager")
        check_rope(m, SPECS[name])
        gs, ls = greedy(m, short_ids[None], 64)
        gl, ll = greedy(m, long_t[None], 64)
        g = {"short_ids": short_ids, "short_logits": ls[0].float(), "long_ids": long_t,
             "long_positions": pos, "long_logits": ll[0, pos].float(), "greedy_short": gs[0], "greedy_long": gl[0]}
        path = os.path.join(gdir, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in g.items()}, path, metadata={"model": name, "note": note})
        back = load_file(path)
        shapes = {"short_ids": (len(short_ids),), "short_logits": (len(short_ids), VOCAB), "long_ids": (T2,),
                  "long_positions": (len(pos),), "long_logits": (len(pos), VOCAB), "greedy_short": (64,),
                  "greedy_long": (64,)}
        for k, shp in shapes.items():
            assert tuple(back[k].shape) == shp and back[k].dtype == g[k].dtype, (k, back[k].shape, back[k].dtype)
        glong = bytes(t if t < 256 else 63 for t in gl[0].tolist())
        log(f"[golden {name}] wrote {path}; greedy_short={bytes(t if t < 256 else 63 for t in gs[0].tolist())!r} "
            f"greedy_long starts {glong[:12]!r} (kv answer {long_ans!r})")
        results[name]["golden_long_answer_ok"] = glong[:6] == long_ans
        del m

        # Sanity: float32 on GPU (TF32 off, eager) must match the float64 goldens closely.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        m = load_model(d, torch.float32, "eager").to("cuda")
        with torch.no_grad():
            s32 = m(input_ids=short_ids[None].cuda()).logits[0].double().cpu()
            l32 = m(input_ids=long_t[None].cuda()).logits[0, pos.cuda()].double().cpu()
        rel_s = float((s32 - back["short_logits"].double()).norm() / back["short_logits"].double().norm())
        rel_l = float((l32 - back["long_logits"].double()).norm() / back["long_logits"].double().norm())
        log(f"[golden {name}] GPU fp32 vs fp64 golden rel L2: short {rel_s:.2e} long {rel_l:.2e}")
        assert rel_s < 1e-3 and rel_l < 1e-3, (rel_s, rel_l)
        results[name]["golden_rel_l2"] = (rel_s, rel_l)
        del m
        torch.cuda.empty_cache()

    # ---- README
    total_s = time.time() - T0
    cmd = "python3 " + " ".join(sys.argv)
    lines = ["# Scout tiny byte-level fixtures (target + draft)", "",
             f"Made by `tools/train_fixtures.py` with `{cmd}` on {date}, on {gpu} (torch {torch.__version__}, "
             f"transformers {transformers.__version__}). Total script wall time {total_s:.0f}s.", "",
             "Byte-level vocabulary: ids 0..255 = bytes, 256 = BOS, 257 = EOS (vocab 258), see `scout_tokenizer.json`. "
             "Models are Hugging Face `LlamaForCausalLM`, trained with transformers' own model class (sdpa attention, "
             "fp32 master weights, bf16 autocast, AdamW betas (0.9, 0.95), weight decay 0.1 on matrices, 100-step "
             "warmup then cosine to 10%, grad clip 1.0), saved as bf16 safetensors sharded at 8 MB.", "",
             "## Data", "",
             f"Text files ({', '.join(EXTS)}; <= 1 MB, no NUL bytes) from this machine's Python installation: "
             f"{', '.join(dinfo['roots'])} ({dinfo['candidate_files']} candidates), shuffled with seed {args.seed}, "
             "joined by blank lines. Train: "
             f"{dinfo['train_files']} files, {dinfo['train_bytes']:,} bytes. Held-out validation: {dinfo['val_files']} "
             f"files, {dinfo['val_bytes']:,} bytes. Each training sequence is BOS + a random window of "
             f"{args.seq_len - 1} bytes; half of them carry a synthetic retrieval task written over the filler "
             "(passkey: one fact in the first 90% and a query at the end; key-value: 4-16 `KEY k = VALUE v` facts "
             "spread over the sequence and 2-4 `QUERY k -> v` lines at the end).", "",
             "## Models", ""]
    for name in ("target", "draft"):
        r, s = results[name], SPECS[name]
        acc = ", ".join(f"{k} {c}/{n}" for k, v in r.items() if "@" in k for c, n in [v])
        lines += [f"### scout-tiny-{name}", "",
                  f"- hidden {s['hidden_size']}, intermediate {s['intermediate_size']}, layers {s['num_hidden_layers']}, "
                  f"heads {s['num_attention_heads']} (kv {s['num_key_value_heads']}), head_dim {s['head_dim']}, "
                  f"tied embeddings {s['tie_word_embeddings']}, rope {json.dumps(r['rope'], sort_keys=True)}",
                  f"- parameters: {r['params']:,}; on disk {r['disk']:,} bytes ({', '.join(r['files'])})",
                  f"- trained {r['steps']} steps (requested {r['requested_steps']}) of batch {args.batch} x "
                  f"{args.seq_len} tokens in {r['train_s']:.0f}s",
                  f"- held-out: {r['bpb']:.4f} bits/byte; greedy retrieval exact matches: {acc} "
                  "(saved bf16 weights, sdpa, bf16 autocast)",
                  f"- golden check: GPU fp32 vs CPU fp64 logits rel L2 short {r['golden_rel_l2'][0]:.1e}, "
                  f"long {r['golden_rel_l2'][1]:.1e}; golden long prompt answered correctly: "
                  f"{r['golden_long_answer_ok']}", ""]
    lines += ["## Goldens (`goldens/`)", "", note, "",
              "`<model>.safetensors` holds short_ids, short_logits [T,258], long_ids, long_positions (0, 64, ... and "
              "the last 16), long_logits [P,258], greedy_short [64], greedy_long [64]. `prompts.json` holds the "
              f"prompt strings (the long one is a key-value retrieval prompt, seed 1234, {long_len} tokens before "
              "cutting right after the last `QUERY <key> -> `).", ""]
    with open(os.path.join(mdir, "README.md"), "w") as f:
        f.write("\n".join(lines))
    log(f"done; wrote {mdir}/README.md; total {total_s:.0f}s")


if __name__ == "__main__":
    main()
