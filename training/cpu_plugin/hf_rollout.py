"""An HF-``generate`` rollout backend for veRL 0.9.1 (``actor_rollout_ref.rollout.name=hf``).

veRL 0.9.1 only wires vLLM, SGLang and TensorRT-LLM rollouts; its ``HFRollout``/``NaiveRollout`` classes are
not registered and do not implement the server interface the V1 trainer uses. This backend implements that
interface with ``transformers``, so GRPO runs where none of those engines exists (a CPU-only machine):

- :class:`HFReplica` (registered in ``RolloutReplicaRegistry``) launches one :class:`HFRolloutServer` Ray
  actor per replica, beside the training ranks of that replica (hybrid mode, like vLLM's).
- :class:`HFRolloutServer` holds a full copy of the model and answers veRL's token-in/token-out
  ``generate(prompt_ids, sampling_params, request_id) -> TokenOutput`` with sampled token ids and their
  log-probs (``log_softmax(logits / temperature)``, what veRL's actor computes). Concurrent requests with the
  same sampling settings are batched into one left-padded ``model.generate`` call.
- :class:`HFServerAdapter` (registered in ``_ROLLOUT_REGISTRY``) lives in each training rank. veRL calls its
  ``update_weights(generator)`` after every step. Under FSDP2 each item of the generator comes from
  ``DTensor.full_tensor()``, a collective: every rank drains the generator, and rank 0 of the replica ships
  the full weights to its server, which loads them with ``load_state_dict``.

``actor_rollout_ref.rollout.engine_kwargs.hf`` takes backend options: ``sync_weights`` (default true; false
keeps the server on its initial weights, a control for tests), ``attn_implementation`` (default ``sdpa``),
``num_threads`` (torch threads of the server, default 1: training ranks and servers share the cores),
``batch_window_s`` (how long a server waits to batch concurrent requests, default 0.005).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from training.errors import HFRolloutError

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"


def hf_engine_options(config: RolloutConfig | Any) -> dict[str, Any]:
    """Return the ``engine_kwargs.hf`` options of a rollout config, with defaults filled in.

    Args:
        config: veRL's ``RolloutConfig`` (dataclass) or the ``actor_rollout_ref.rollout`` DictConfig.

    Returns:
        ``{"sync_weights": bool, "attn_implementation": str, "num_threads": int, "batch_window_s": float}``.

    Example:
        >>> hf_engine_options({"engine_kwargs": {"hf": {"sync_weights": False}}})["sync_weights"]
        False
    """
    engine_kwargs = config.get("engine_kwargs", None) if hasattr(config, "get") else config.engine_kwargs
    options = dict((engine_kwargs or {}).get(ROLLOUT_NAME, None) or {})
    return {
        "sync_weights": bool(options.get("sync_weights", True)),
        "attn_implementation": str(options.get("attn_implementation", "sdpa")),
        "num_threads": int(options.get("num_threads", 1)),
        "batch_window_s": float(options.get("batch_window_s", 0.005)),
    }


def server_actor_name(replica_rank: int, node_rank: int = 0, suffix: str = "") -> str:
    """Name of the Ray actor serving a replica; the adapter in each training rank finds it by this name."""
    return f"{ROLLOUT_NAME}_server_{replica_rank}_{node_rank}{suffix}"


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    future: asyncio.Future = field(repr=False)

    @property
    def batch_key(self) -> tuple:
        return (self.max_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty)


class HFRolloutServer:
    """Ray actor: a full model copy that generates with ``transformers`` and accepts weight updates.

    Args:
        config: the rollout config (``RolloutConfig``).
        model_config: the model config (``HFModelConfig``), whose ``local_path`` holds the HF checkpoint.
        replica_rank: rank of the replica this server belongs to (for logs and per-request seeds).
    """

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, replica_rank: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from verl.utils.config import omega_conf_to_dataclass

        config = omega_conf_to_dataclass(config)
        model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.config = config
        self.replica_rank = replica_rank
        self.options = hf_engine_options(config)
        torch.set_num_threads(max(1, self.options["num_threads"]))
        path = model_config.local_path
        trust = bool(getattr(model_config, "trust_remote_code", False))
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=self.options["attn_implementation"], trust_remote_code=trust
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.global_steps: int | None = None
        self.weight_version = 0
        self._queue: list[_Request] = []
        self._batcher: asyncio.Task | None = None
        # One lock for the model: generation and weight loading never overlap.
        self._model_lock = threading.Lock()
        logger.info("HF rollout server %d ready: %s (eos %s, pad %d)", replica_rank, path, self.eos_ids, self.pad_id)

    # -- token-in / token-out generation --------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """Sample one response for ``prompt_ids``; veRL's ``LLMServerClient`` calls this per trajectory.

        Args:
            prompt_ids: prompt token ids.
            sampling_params: ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``logprobs``,
                ``max_tokens``/``max_new_tokens`` (default: the configured ``response_length``).
            request_id: veRL's request id (unused: each request is independent).

        Returns:
            ``TokenOutput`` with the response token ids (the eos token included, as vLLM does), their
            log-probs, and ``stop_reason`` ``"completed"`` (eos) or ``"length"``.

        Raises:
            HFRolloutError: for image/video inputs, or a prompt that leaves no room to generate.
        """
        if image_data is not None or video_data is not None:
            raise HFRolloutError("the hf rollout backend is text-only; use rollout.name=vllm for multimodal models")
        params = dict(sampling_params)
        max_model_len = self.config.max_model_len or (self.config.prompt_length + self.config.response_length)
        room = max_model_len - len(prompt_ids)
        if room < 1:
            raise HFRolloutError(
                f"prompt of {len(prompt_ids)} tokens leaves no room to generate within max_model_len={max_model_len}"
            )
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", self.config.response_length))
        top_k = params.get("top_k", -1)
        request = _Request(
            prompt_ids=list(prompt_ids),
            max_tokens=max(1, min(int(max_tokens), room)),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(top_k) if top_k is not None else -1,
            repetition_penalty=float(params.get("repetition_penalty", 1.0)),
            future=asyncio.get_running_loop().create_future(),
        )
        self._queue.append(request)
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._run_batches())
        token_ids, log_probs, stop_reason = await request.future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs,
            stop_reason=stop_reason,
            extra_fields={"global_steps": self.global_steps},
        )

    async def _run_batches(self) -> None:
        # Requests arrive as a burst of concurrent RPCs; a short wait lets them join one generate call.
        while self._queue:
            await asyncio.sleep(self.options["batch_window_s"])
            pending, self._queue = self._queue, []
            groups: dict[tuple, list[_Request]] = {}
            for request in pending:
                groups.setdefault(request.batch_key, []).append(request)
            for group in groups.values():
                try:
                    results = await asyncio.to_thread(self._generate_batch, group)
                except Exception as exc:  # hand the failure to every waiting caller, keep serving others
                    for request in group:
                        request.future.set_exception(exc)
                    continue
                for request, result in zip(group, results, strict=True):
                    request.future.set_result(result)

    @torch.no_grad()
    def _generate_batch(self, group: list[_Request]) -> list[tuple[list[int], list[float], str]]:
        first = group[0]
        width = max(len(r.prompt_ids) for r in group)
        # Left padding: every prompt ends at the same column, so new tokens line up.
        input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, request in enumerate(group):
            n = len(request.prompt_ids)
            input_ids[row, width - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            attention_mask[row, width - n :] = 1
        greedy = first.temperature <= 0.0
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": first.max_tokens,
            "do_sample": not greedy,
            "eos_token_id": self.eos_ids or None,
            "pad_token_id": self.pad_id,
            "return_dict_in_generate": True,
            "output_logits": True,
            "repetition_penalty": first.repetition_penalty,
        }
        if not greedy:
            gen_kwargs.update(temperature=first.temperature, top_p=first.top_p, top_k=max(first.top_k, 0))
        with self._model_lock:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
        new_tokens = out.sequences[:, width:]  # (B, T)
        logits = torch.stack(out.logits, dim=1).float()  # (B, T, V): raw logits, before any sampling warper
        if not greedy:
            logits = logits / first.temperature
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        results = []
        eos = set(self.eos_ids)
        for row in range(len(group)):
            ids = new_tokens[row].tolist()
            end, stop_reason = len(ids), "length"
            for i, tok in enumerate(ids):
                if tok in eos:
                    end, stop_reason = i + 1, "completed"
                    break
            results.append((ids[:end], log_probs[row, :end].tolist(), stop_reason))
        return results

    # -- weights ------------------------------------------------------------------------------------------------
    def update_weights(self, state_dict: dict[str, torch.Tensor], global_steps: int | None = None) -> int:
        """Load full (unsharded) weights sent by the training rank; return the new weight version.

        Raises:
            HFRolloutError: if a name is unknown to the model, or a parameter is missing that is not tied.
        """
        with self._model_lock:
            result = self.model.load_state_dict(state_dict, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or {})
        missing = [k for k in result.missing_keys if k not in tied]
        if result.unexpected_keys or missing:
            raise HFRolloutError(
                f"weight sync mismatch on replica {self.replica_rank}: unexpected {result.unexpected_keys[:5]}, "
                f"missing {missing[:5]}"
            )
        self.weight_version += 1
        if global_steps is not None:
            self.global_steps = global_steps
        return self.weight_version

    def get_weight_version(self) -> int:
        """How many weight updates this server has loaded (0: still the initial checkpoint)."""
        return self.weight_version

    def named_parameter_checksums(self) -> dict[str, float]:
        """Sum of each parameter (a cheap fingerprint for tests and debugging)."""
        return {name: float(p.detach().double().sum()) for name, p in self.model.named_parameters()}

    # -- lifecycle calls veRL makes on every server; nothing to free on CPU ---------------------------------------
    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        while self._queue or (self._batcher is not None and not self._batcher.done()):
            await asyncio.sleep(0.01)

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        # Requests finish in one generate call; there is nothing partial to abort.
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


class HFReplica(RolloutReplica):
    """A rollout replica served by one :class:`HFRolloutServer` actor (hybrid mode only)."""

    async def launch_servers(self) -> None:
        if self.rollout_mode != RolloutMode.HYBRID:
            raise HFRolloutError(
                f"the hf rollout backend supports hybrid mode (actor and rollout colocated) only, got "
                f"{self.rollout_mode}; set actor_rollout_ref.hybrid_engine=true"
            )
        if self.nnodes != 1:
            raise HFRolloutError("the hf rollout backend serves a replica from one node; use tensor_model_parallel_size=1")
        node_id = await self.workers[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        name = server_actor_name(self.replica_rank, 0, self.name_suffix)
        server = (
            ray.remote(HFRolloutServer)
            .options(
                name=name,
                num_cpus=0,
                max_concurrency=self.max_concurrency,
                scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                    node_id=node_id, soft=False
                ),
            )
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.__ray_ready__.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{ROLLOUT_NAME}://{name}"


class HFServerAdapter(BaseRollout):
    """Rollout handle inside each training rank: forwards weight updates to the replica's server.

    Args:
        config: rollout config. model_config: model config. device_mesh: the rollout mesh veRL builds.
        replica_rank: the replica this rank belongs to; -1 derives it from ``RANK``.
    """

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        device_mesh: Any,
        replica_rank: int = -1,
    ) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ["RANK"])
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world_size
        self.options = hf_engine_options(self.config)
        self._server: ray.actor.ActorHandle | None = None

    @property
    def ships_weights(self) -> bool:
        """Whether this rank sends the weights to the server (rank 0 of each replica)."""
        return self.rollout_rank == 0

    def _server_handle(self) -> ray.actor.ActorHandle:
        # The server starts after the training engine, so look it up on first use.
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        wire_format: str = "named_tensors",
        global_steps: int | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        """Drain the weight generator on every rank; rank 0 of the replica ships the weights to its server.

        Raises:
            HFRolloutError: for LoRA adapters or delta wire formats (not supported by this backend).
        """
        if wire_format != "named_tensors":
            raise HFRolloutError(f"hf rollout supports wire_format='named_tensors' only, got {wire_format!r}")
        if peft_config is not None:
            raise HFRolloutError("hf rollout does not load LoRA adapters; set actor_rollout_ref.model.lora.merge=true")
        start = time.perf_counter()
        ship = self.ships_weights and self.options["sync_weights"]
        state: dict[str, torch.Tensor] = {}
        # Every rank must iterate to the end: each item is produced by a collective (DTensor.full_tensor()).
        for name, tensor in weights:
            if ship:
                state[name] = tensor.detach().to("cpu", copy=True)
        if not ship:
            if self.ships_weights and global_steps is not None:
                # Sync disabled (a test control): the server keeps its weights but still reports the step,
                # which veRL's staleness metrics require.
                await self._server_handle().set_global_steps.remote(global_steps)
            return None
        version = await self._server_handle().update_weights.remote(state, global_steps)
        logger.info(
            "hf rollout replica %d: weights v%d (%d tensors) in %.2fs",
            self.replica_rank,
            version,
            len(state),
            time.perf_counter() - start,
        )
        return None
