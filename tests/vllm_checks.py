"""Checks that need vLLM, run by the tests with `.venv-vllm`'s python (the main .venv has no vLLM); JSON on stdout.

    .venv-vllm/bin/python -m tests.vllm_checks fixes                   # the CPU plugin's vLLM fixes: needed, and right
    .venv-vllm/bin/python -m tests.vllm_checks greedy DIR [DIR ...]    # vllm.LLM vs transformers, greedy tokens
    .venv-vllm/bin/python -m tests.vllm_checks greedy --hub REPO@REV   # the same on a model downloaded from HF_ENDPOINT

Each check prints facts (what vLLM did, what the fix changed); `tests/test_vllm_*.py` assert on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# Prompts in the demo's shape (chat template + a chain_sum question) and two bare ones.
PROMPTS = [
    "<|im_start|>user\nWhat is 3 + 4? Put the answer in <answer></answer>.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n7 + 2 =<|im_end|>\n"
    "<|im_start|>assistant\n<think>",
    "Count the letters in strawberry:",
    "<answer>",
]
MAX_TOKENS = 24


def _fixes() -> dict[str, Any]:
    """What vLLM 0.31.0's CPU backend does without the plugin's fixes, and what the fixes do (no model load)."""
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {}
    # 1. distribution name: is there a `vllm` distribution (then the shim is unnecessary)?
    try:
        out["vllm_distribution"] = md.version("vllm")
    except md.PackageNotFoundError:
        out["vllm_distribution"] = None
    out["vllm_cpu_distribution"] = md.version("vllm-cpu")
    import vllm
    from vllm.platforms import current_platform

    out["vllm_module_version"] = vllm.__version__
    out["vllm_platform_is_cpu"] = bool(current_platform.is_cpu())
    from vllm.platforms import vllm_version_matches_substr

    out["vllm_detects_cpu_build_unshimmed"] = bool(vllm_version_matches_substr("cpu"))

    from training.cpu_plugin import vllm_cpu

    os.environ.pop("VERL_PLATFORM", None)
    vllm_cpu.register_vllm_plugin()  # without the request: must change nothing
    from vllm.model_executor.layers import utils as layer_utils

    out["gated_without_request"] = not hasattr(layer_utils.dispatch_cpu_unquantized_gemm, "__verl_grpo_hub_vllm_cpu__")
    out["shim_installed"] = vllm_cpu.install_vllm_version_shim()
    out["shimmed_vllm_version"] = md.version("vllm")
    out["vllm_detects_cpu_build_shimmed"] = bool(vllm_version_matches_substr("cpu"))
    # veRL's own check, as its vLLM rollout package runs it (imported after the shim, like in a worker)
    from verl.workers.rollout.vllm_rollout import vllm_package_version

    out["verl_sees_vllm_version"] = vllm_package_version

    # 2. prepacked linear: vLLM's own dispatch on a (N=64, K=64) fp32 linear layer, as LinearBase calls it
    #    (remove_weight=True) and as the lm_head calls it (remove_weight=False); then the replacement.
    original = layer_utils.dispatch_cpu_unquantized_gemm

    def run(dispatch, remove_weight: bool) -> dict[str, Any]:
        torch.manual_seed(0)
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
        layer.weight.weight_loader = lambda *a: None  # what vLLM's parameters carry and veRL's sync relies on
        x = torch.randn(3, 64)
        dispatch(layer, remove_weight=remove_weight)
        kept = layer.weight.numel() == 64 * 64 and hasattr(layer.weight, "weight_loader")
        result: dict[str, Any] = {"weight_kept": bool(kept)}
        if kept:  # a weight sync writes new values into the parameter in place
            new = torch.randn(64, 64)
            layer.weight.data.copy_(new)
            y = layer.cpu_linear(x, layer.weight, None)
            result["follows_updated_weight"] = bool(torch.allclose(y, x @ new.T, atol=1e-4))
        return result

    out["original_linear"] = run(original, True)
    out["original_lm_head"] = run(original, False)
    vllm_cpu.install_plain_cpu_linear()
    out["patched_linear"] = run(layer_utils.dispatch_cpu_unquantized_gemm, True)
    out["patched_lm_head"] = run(layer_utils.dispatch_cpu_unquantized_gemm, False)
    import inspect

    from vllm.model_executor.layers import linear, vocab_parallel_embedding

    needle = "from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm"
    out["dispatch_imported_at_call_time"] = needle in inspect.getsource(linear) and needle in inspect.getsource(
        vocab_parallel_embedding
    )
    return out


def _greedy(model_dirs: list[str]) -> dict[str, Any]:
    """Greedy tokens of vllm.LLM and of transformers for PROMPTS, per model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    results: dict[str, Any] = {}
    for path in model_dirs:
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf_tokens = []
        with torch.no_grad():
            for ids in prompt_ids:
                out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                        do_sample=False, pad_token_id=tokenizer.pad_token_id)
                hf_tokens.append(out[0, len(ids):].tolist())
        del hf_model
        llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0,
                  kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False)
        # Both sides write MAX_TOKENS tokens and keep the end-of-text ids (generation_config's eos_token_id list:
        # <|im_end|> and <|endoftext|>) out of them: transformers' min_new_tokens masks that list, vLLM's
        # min_tokens masks the same list (all_stop_token_ids); ignore_eos alone would let vLLM write them where
        # transformers cannot, and a model that learnt to end its answers (the warm model) then differs there.
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        vllm_tokens = [list(o.outputs[0].token_ids) for o in outs]
        del llm
        results[path] = {"hf": hf_tokens, "vllm": vllm_tokens, "files": sorted(os.listdir(path))}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fixes")
    greedy = sub.add_parser("greedy")
    greedy.add_argument("dirs", nargs="*")
    greedy.add_argument("--hub", action="append", default=[], help="REPO@REVISION on HF_ENDPOINT (token: HF_TOKEN)")
    greedy.add_argument("--hub-dir", default=None, help="where to download --hub models")
    args = parser.parse_args(argv)
    if args.cmd == "fixes":
        result = _fixes()
    else:
        dirs = list(args.dirs)
        downloads = {}
        for spec in args.hub:
            from huggingface_hub import snapshot_download

            repo_id, _, revision = spec.partition("@")
            local = os.path.join(args.hub_dir or ".", repo_id.replace("/", "--"))
            path = snapshot_download(repo_id, revision=revision or None, local_dir=local)
            downloads[spec] = path
            dirs.append(path)
        result = {"models": _greedy(dirs), "downloads": downloads}
    print("VLLM_CHECKS " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
