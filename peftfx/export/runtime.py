"""Serving an exported model with ONNX Runtime: :class:`Runtime`.

Provider choice: the CUDA provider only when a GPU is present and this onnxruntime build offers it, else the CPU
provider — never asking ORT for a provider that would fail to load and print errors on a CPU-only machine.
``Runtime.provider`` is the provider used and ``Runtime.provider_reason`` why (e.g. "CUDAExecutionProvider not
available: a GPU is visible but the onnxruntime CPU build is installed; pip … 'peftfx[gpu]'"). ORT's
own log is kept to errors (``log_severity_level=3``). On CUDA, runs use I/O binding: inputs go to the device once,
outputs stay there, and the key/value cache of :meth:`Runtime.generate` never leaves the GPU between steps.
Inputs may be numpy arrays, torch tensors or lists. Before ONNX Runtime sees them they are checked against the
model, and anything that would run wrongly or fail inside ORT is an :class:`~peftfx.ExportError` naming the input:
an unknown or missing name, the wrong number of dimensions or a fixed dimension of the wrong size, a dtype that
cannot be converted without changing values (float token ids are refused, never truncated; ints and bools convert
to float, narrower ints to wider), and token ids outside ``[0, vocab)`` where the vocabulary size is found from the
embedding table the ids index (a ``Gather`` over an initializer, read once from the file without its weights).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import numpy as np

from .._errors import CheckpointError, ExportError

__all__ = ["Runtime", "gpu_present", "provider_choice", "select_providers"]

log = logging.getLogger(__name__)

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def gpu_present() -> bool:
    """A CUDA device is visible (torch says so, or the NVIDIA driver lists a GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.isdir(gpus) and bool(os.listdir(gpus))


def provider_choice(device: str | None = None) -> tuple[list[str], str]:
    """(providers, why): ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when CUDA is usable (or
    ``device="cuda"``), else ``["CPUExecutionProvider"]``, with the reason in words."""
    import onnxruntime as ort

    if device not in (None, "cpu", "cuda"):
        raise ExportError(f"device must be 'cpu', 'cuda' or None (automatic), got {device!r}.")
    available = ort.get_available_providers()
    cuda_build = "CUDAExecutionProvider" in available
    if device == "cpu":
        return ["CPUExecutionProvider"], "device='cpu' asked for"
    gpu = gpu_present()
    if (device == "cuda" or gpu) and cuda_build:
        if device == "cuda" and not gpu:
            raise ExportError("device='cuda' asked for, but no GPU is visible on this machine; use device='cpu'.")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], \
            ("device='cuda' asked for" if device == "cuda" else "a GPU is visible and this onnxruntime has CUDA")
    if device == "cuda":
        raise ExportError(f"device='cuda' asked for, but this onnxruntime offers {available}; install the GPU build: "
                          "pip uninstall -y onnxruntime && pip install 'peftfx[gpu]'.")
    if gpu:
        why = ("CUDAExecutionProvider not available: a GPU is visible but the onnxruntime CPU build is installed; "
               "pip uninstall -y onnxruntime && pip install 'peftfx[gpu]'")
    elif cuda_build:
        why = "CUDAExecutionProvider not used: the onnxruntime GPU build is installed but no GPU is visible"
    else:
        why = "CUDAExecutionProvider not available: onnxruntime CPU build installed and no GPU visible"
    return ["CPUExecutionProvider"], why


def select_providers(device: str | None = None) -> list[str]:
    """The providers of :func:`provider_choice`, without the reason."""
    return provider_choice(device)[0]


class Runtime:
    """An ONNX Runtime session over a peftfx export.

        rt = Runtime("model.onnx")                  # CUDA if present, else CPU
        rt.run({"input_ids": ids})["logits"]
        rt.generate(ids, max_new_tokens=32)         # files exported with kv_cache=True
        rt.generate(ids, 32, attention_mask=mask)   # kv_cache="padded": left-padded prompts of different lengths
        rt.load_adapter("a", "a.onnx_adapter"); rt.run({"input_ids": ids}, adapter="a")   # adapter_inputs=True
    """

    def __init__(self, path: str | os.PathLike, *, device: str | None = None, providers: list[str] | None = None,
                 threads: int | None = None, io_binding: bool | None = None, spin: bool = True):
        import onnxruntime as ort

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ExportError(f"no ONNX model at {path!r}.")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        if not spin:     # idle ORT threads busy-wait by default, stealing cores from whatever runs between calls
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers:
            why = f"providers={list(providers)} asked for"
        else:
            providers, why = provider_choice(device)
        t = time.perf_counter()
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as e:  # ORT raises Fail/InvalidGraph/NoSuchFile …
            raise ExportError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None
        self.path = path
        self.session_seconds = time.perf_counter() - t      # session creation (graph optimisation, weights)
        self.providers: list[str] = self.session.get_providers()
        self.provider = self.providers[0]
        if providers[0] not in self.providers:
            why = f"{providers[0]} failed to load in ONNX Runtime, fell back to {self.provider} ({why})"
        self.provider_reason: str = why
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        raw = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = {k: _maybe_json(v) for k, v in raw.items()}
        self._in = {i.name: i for i in self.session.get_inputs()}
        self._required = list(self._in)
        self._in.update({i.name: i for i in self.session.get_overridable_initializers()})
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.kv = self.metadata.get("peftfx.kv_cache")
        self._adapters: dict[str, tuple[Any, dict[str, np.ndarray], dict[str, Any]]] = {}
        self.step_times: list[float] = []

    # ------------------------------------------------------------------------------------------- inputs
    @property
    def inputs(self) -> dict[str, list]:
        """Graph inputs a caller feeds (adapter parameters excluded), with their shapes."""
        adapter = {n for n, _ in self.metadata.get("peftfx.adapter_inputs", [])}
        return {n: list(i.shape) for n, i in self._in.items() if n not in adapter}

    def input_dtype(self, name: str):
        return _NP_TYPES.get(self._in[name].type, np.float32)

    def _array(self, name: str, value: Any) -> np.ndarray:
        """``value`` as the array input ``name`` takes; refuses conversions that would change values."""
        if not isinstance(name, str) or name not in self._in:
            raise ExportError(f"{os.path.basename(self.path)} has no input {name!r}; "
                              f"its inputs are {list(self.inputs)}.")
        if hasattr(value, "detach"):                  # torch tensor
            value = value.detach().cpu().numpy()
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise ExportError(f"input {name!r} cannot be made into an array ({e}); pass a numpy array, a torch "
                              "tensor or a rectangular list.") from None
        want = np.dtype(self.input_dtype(name))
        if not _converts(arr, want):
            hint = " Token ids are whole numbers: convert them with .astype('int64') (or .long()) after checking " \
                   "they are integers." if arr.dtype.kind == "f" and want.kind in "iu" else ""
            raise ExportError(f"input {name!r} has dtype {arr.dtype}, but {os.path.basename(self.path)} takes "
                              f"{want}; it is not converted silently, as that would change the values.{hint}")
        return arr.astype(want, order="C", copy=False)    # (np.ascontiguousarray would make a 0-d input 1-d)

    def _check(self, name: str, arr: np.ndarray) -> None:
        """Rank, fixed dimensions and token range of one input, against the model."""
        dims = list(self._in[name].shape or [])
        if dims and arr.ndim != len(dims):
            raise ExportError(f"input {name!r} has {arr.ndim} dimension(s) {list(arr.shape)}, but "
                              f"{os.path.basename(self.path)} takes {len(dims)}: {dims}.")
        for i, (d, n) in enumerate(zip(dims, arr.shape)):
            if isinstance(d, int) and d > 0 and d != n:
                raise ExportError(f"input {name!r} has size {n} in dimension {i}, but {os.path.basename(self.path)} "
                                  f"takes exactly {d} there (shape {dims}).")
        vocab = self.vocab.get(name) if arr.dtype.kind in "iu" else None
        if vocab is not None and arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab):
            bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
            raise ExportError(f"input {name!r} holds token id {bad}, outside the model's vocabulary [0, {vocab}); "
                              "check the tokenizer matches the model.")

    @property
    def vocab(self) -> dict[str, int]:
        """Input name → size of the embedding table it indexes (found from the file, once), for token range checks."""
        if getattr(self, "_vocab", None) is None:
            self._vocab = _gather_sizes(self.path, [n for n in self._required
                                                    if self._in[n].type in ("tensor(int64)", "tensor(int32)")])
        return self._vocab

    # ------------------------------------------------------------------------------------------- adapters
    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Make an ONNX Runtime adapter file available as ``adapter=name``; checked against the model first."""
        import onnxruntime as ort

        from .adapters import check_adapter_fits, fingerprint, read_onnx_adapter

        layout = self.metadata.get("peftfx.adapter_inputs")
        if layout is None:
            raise ExportError(f"{os.path.basename(self.path)} was exported without adapter inputs; export with "
                              "adapter_inputs=True to serve adapter files.")
        layout = [(n, tuple(s)) for n, s in layout]
        version, params = read_onnx_adapter(path)
        check_adapter_fits({k: v.shape for k, v in params.items()}, layout, os.fspath(path))
        if version != fingerprint(layout):
            raise CheckpointError(f"the adapter {os.fspath(path)} was written for another model (fingerprint "
                                  f"{version}, this model {fingerprint(layout)}).")
        adapter = ort.LoraAdapter()
        adapter.Load(os.fspath(path))
        self._adapters[name] = (adapter, params, {})

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    def _adapter(self, name: str | None):
        if name is None:
            return None
        if name not in self._adapters:
            raise ExportError(f"no adapter named {name!r} is loaded; loaded: {self.adapters or 'none'} "
                              "(Runtime.load_adapter(name, path)).")
        return self._adapters[name]

    # ------------------------------------------------------------------------------------------- running
    def run(self, feeds: Mapping[str, Any] | None = None, *, adapter: str | None = None,
            **kwargs: Any) -> dict[str, np.ndarray]:
        """Run the model; returns every output as a numpy array, by name. ``adapter``: a loaded adapter's name."""
        if feeds is not None and not isinstance(feeds, Mapping):
            raise ExportError(f"Runtime.run takes a dict of inputs by name (or keyword arguments), got "
                              f"{type(feeds).__name__}; the inputs are {list(self.inputs)}.")
        arrays = {k: self._array(k, v) for k, v in {**(feeds or {}), **kwargs}.items()}
        for k, v in arrays.items():
            self._check(k, v)
        out = self._execute(arrays, adapter)
        return {k: v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else v for k, v in out.items()}

    def _execute(self, feeds: dict[str, Any], adapter: str | None) -> dict[str, Any]:
        missing = [n for n in self._required if n not in feeds]
        if missing:
            raise ExportError(f"missing input(s) {missing} for {os.path.basename(self.path)}.")
        entry = self._adapter(adapter)
        if self.io_binding:
            return self._execute_bound(feeds, entry)
        import onnxruntime as ort

        opts = None
        if entry is not None:
            opts = ort.RunOptions()
            opts.add_active_adapter(entry[0])
        try:
            values = self.session.run(self.outputs, feeds, opts)
        except Exception as e:          # ORT's own errors (InvalidArgument, Fail …), past the checks in run()
            raise self._ort_error(e) from None
        return dict(zip(self.outputs, values))

    def _execute_bound(self, feeds: dict[str, Any], entry) -> dict[str, Any]:
        """I/O binding (the adapter's parameters are bound as inputs: RunOptions adapters do not apply to binding)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        device = self.device
        for name, v in feeds.items():
            binding.bind_ortvalue_input(name, v if isinstance(v, ort.OrtValue)
                                        else ort.OrtValue.ortvalue_from_numpy(v, device, 0))
        if entry is not None:
            _, params, on_device = entry
            for name, arr in params.items():
                if name not in on_device:
                    on_device[name] = ort.OrtValue.ortvalue_from_numpy(arr.astype(self.input_dtype(name)), device, 0)
                binding.bind_ortvalue_input(name, on_device[name])
        for name in self.outputs:
            binding.bind_output(name, device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:          # ORT's own errors, past the checks in run()
            raise self._ort_error(e) from None
        return dict(zip(self.outputs, binding.get_outputs()))

    def _ort_error(self, e: Exception) -> ExportError:
        text = str(e).strip()
        return ExportError(f"ONNX Runtime could not run {os.path.basename(self.path)}: "
                           f"{text.splitlines()[0][:300] if text else type(e).__name__}")

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, input_ids: Any, max_new_tokens: int = 32, *, attention_mask: Any = None,
                 eos_token_id: int | None = None, adapter: str | None = None,
                 shared_buffers: bool | None = None) -> np.ndarray:
        """Greedy decoding with the key/value cache: one prefill over the prompt, then one single-token step per new
        token. Returns prompt + new tokens (rows that produced ``eos_token_id`` are padded with it).

        ``attention_mask`` (``[batch, prompt]``, 0 at left padding) lets prompts of different lengths share a batch,
        left-padded as Hugging Face ``generate`` takes them; it needs a ``kv_cache="padded"`` file (which also takes
        the position ids, counted from each row's first real token). A file without a mask input takes prompts of
        equal length only (a mask of ones is accepted). The cache is fed in the file's layout (``peftfx.kv_cache``
        ``layout``: as traced, or GroupQueryAttention's ``[batch, kv_heads, sequence, head_dim]``).

        ``shared_buffers`` (default: whenever the file allows it, :func:`~peftfx.export._kv_fusion.shares_buffers`:
        a fused ``kv_cache="padded"`` file): the cache lives in one preallocated ``[batch, kv_heads, prompt +
        max_new_tokens, head_dim]`` buffer per tensor, bound with I/O binding as both the past input and the present
        output, which ``GroupQueryAttention`` writes in place; the step's logits go to a preallocated buffer too —
        no allocation or copy of the cache between steps. Otherwise each step's ``present.*`` outputs are fed back as
        the next ``past_key_values.*`` (ONNX Runtime values, with I/O binding; numpy arrays without).
        ``self.step_times`` holds the seconds of each step (prefill first)."""
        if not self.kv:
            raise ExportError(f"{os.path.basename(self.path)} has no key/value cache inputs; export it with "
                              "kv_cache=True to generate.")
        ids = self._array("input_ids", input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        self._check("input_ids", ids)
        padded = "mask_inputs" in self.kv
        mask = self._prompt_mask(ids, attention_mask, padded)
        if max_new_tokens < 1:
            return ids
        if shared_buffers is None:
            shared_buffers = self._shares_buffers() and adapter is None
        elif shared_buffers and not self._shares_buffers():
            raise ExportError(f"{os.path.basename(self.path)} cannot share its cache buffers between steps (that "
                              "needs a kv_cache='padded' file whose attention is fused, optimize='all' on CPU).")
        self.step_times = []
        if shared_buffers:
            if adapter is not None:
                raise ExportError("shared_buffers=True serves the model without an adapter; pass adapter=None or "
                                  "shared_buffers=False.")
            return self._generate_shared(ids, mask, max_new_tokens, eos_token_id)
        return self._generate_plain(ids, mask if padded else None, max_new_tokens, eos_token_id, adapter)

    def _prompt_mask(self, ids: np.ndarray, attention_mask: Any, padded: bool) -> np.ndarray:
        if attention_mask is None:
            return np.ones(ids.shape, np.int64)
        mask = np.asarray(attention_mask.detach().cpu().numpy() if hasattr(attention_mask, "detach")
                          else attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape or mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
            raise ExportError(f"attention_mask must be 0/1 integers of the prompt's shape {list(ids.shape)}, got "
                              f"{mask.dtype} {list(mask.shape)}.")
        mask = mask.astype(np.int64)
        if not mask[:, -1].all() or (np.diff(mask, axis=1) < 0).any():
            raise ExportError("attention_mask must be left padding (zeros, then ones, each row ending with a real "
                              "token), as Hugging Face generate takes a decoder's batch (tokenizer padding_side="
                              "'left').")
        if not padded and not mask.all():
            raise ExportError(f"{os.path.basename(self.path)} takes no attention mask, so its rows must have equal "
                              "length; export with kv_cache='padded' to generate for left-padded prompts.")
        return mask

    def _shares_buffers(self) -> bool:
        if getattr(self, "_shares", None) is None:
            from ._kv_fusion import LAYOUTS, shares_buffers

            kv = self.kv or {}       # only a fused file (GroupQueryAttention's layout) can: no file read otherwise
            self._shares = "mask_inputs" in kv and kv.get("layout") == LAYOUTS["bnsh"] and shares_buffers(self.path)
        return self._shares

    def _next_tokens(self, last: np.ndarray, done: np.ndarray, eos_token_id: int | None) -> np.ndarray:
        nxt = last.argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            nxt = np.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        return nxt

    def _generate_plain(self, ids, mask, max_new_tokens, eos_token_id, adapter) -> np.ndarray:
        from ._kv_fusion import mask_feeds
        from ._kv_fusion import cache_shape

        pasts, presents = self.kv["inputs"], self.kv["outputs"]
        dtype = self.input_dtype(pasts[0])
        feeds: dict[str, Any] = {n: np.zeros(cache_shape(self.kv, ids.shape[0], 0), dtype) for n in pasts}
        tokens, current = [ids], ids
        done = np.zeros(ids.shape[0], dtype=bool)
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            masks = mask_feeds(mask, current.shape[1]) if mask is not None else {}
            out = self._execute({"input_ids": current, **masks, **feeds}, adapter)
            logits = out["logits"]
            nxt = self._next_tokens((logits.numpy() if not isinstance(logits, np.ndarray) else logits)[:, -1], done,
                                    eos_token_id)
            feeds = {p: out[q] for p, q in zip(pasts, presents)}
            current = nxt[:, None]
            if mask is not None:
                mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
            tokens.append(current)
            self.step_times.append(time.perf_counter() - t0)
            if eos_token_id is not None and done.all():
                break
        return np.concatenate(tokens, axis=1)

    def _generate_shared(self, ids, mask, max_new_tokens, eos_token_id) -> np.ndarray:
        """Preallocated cache buffers (past and present bound to the same value), logits into a preallocated buffer."""
        import onnxruntime as ort

        from ._kv_fusion import mask_feeds

        b, p = ids.shape
        total_max = p + max_new_tokens
        kv = self.kv
        dtype = self.input_dtype(kv["inputs"][0])
        shape = [b, int(kv["kv_heads"]), total_max, int(kv["head_dim"])]
        if self.device == "cuda":
            caches = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0) for _ in kv["inputs"]]
        else:       # CPU: ORT values over numpy arrays (kept alive with them); zeros, never read past the length
            arrays = [np.zeros(shape, dtype) for _ in kv["inputs"]]
            caches = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        binding = self.session.io_binding()
        for past, present, value in zip(kv["inputs"], kv["outputs"], caches):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        device = self.device
        full = np.ones((b, total_max), np.int64)
        full[:, :p] = mask
        tokens, current, logits_value, step_logits = [ids], ids, None, None
        done = np.zeros(b, dtype=bool)
        positions = None
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            total = p + step
            if step == 0:
                feeds = mask_feeds(mask, p)
                binding.bind_output("logits", device)
            else:
                feeds = {"attention_mask": np.ascontiguousarray(full[:, :total]), "position_ids": positions}
            feeds["input_ids"] = current
            for name, arr in feeds.items():
                binding.bind_cpu_input(name, arr)
            try:
                self.session.run_with_iobinding(binding)
            except Exception as e:  # noqa: BLE001 - ORT's own errors, past the checks in generate()
                raise self._ort_error(e) from None
            if step == 0:
                last = binding.get_outputs()[len(kv["outputs"])].numpy()[:, -1]      # bound after the caches
                vocab = last.shape[-1]
                if device == "cuda":
                    logits_value = ort.OrtValue.ortvalue_from_shape_and_type([b, 1, vocab], last.dtype, "cuda", 0)
                else:
                    step_logits = np.empty((b, 1, vocab), last.dtype)
                    logits_value = ort.OrtValue.ortvalue_from_numpy(step_logits)
                binding.bind_ortvalue_output("logits", logits_value)
                positions = feeds["position_ids"][:, -1:] + 1
            else:
                last = (step_logits if step_logits is not None else logits_value.numpy())[:, -1]
                positions = positions + 1
            nxt = self._next_tokens(last, done, eos_token_id)
            current = nxt[:, None]
            tokens.append(current)
            self.step_times.append(time.perf_counter() - t0)
            if eos_token_id is not None and done.all():
                break
        return np.concatenate(tokens, axis=1)

    def __repr__(self) -> str:
        return f"Runtime({self.path!r}, provider={self.provider!r} ({self.provider_reason}), io_binding={self.io_binding})"


def _converts(arr: np.ndarray, want: np.dtype) -> bool:
    """Whether ``arr`` becomes dtype ``want`` without changing a value's meaning: same dtype; bool or int to float;
    bool to int; int to int when every value fits; float to float. Never float to int."""
    have = arr.dtype
    if have == want or (have.kind == "b" and want.kind in "iuf") or (have.kind in "iuf" and want.kind == "f"):
        return True
    if have.kind in "iu" and want.kind in "iu":
        if np.can_cast(have, want) or not arr.size:
            return True
        info = np.iinfo(want)
        return info.min <= int(arr.min()) and int(arr.max()) <= info.max
    return want.kind == "b" and have.kind == "b"


_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"}


def _gather_sizes(path: str, names: list[str]) -> dict[str, int]:
    """For each integer input, the smallest first dimension of a constant table that a ``Gather`` indexes with it
    (directly or through casts and reshapes): the vocabulary of ``input_ids``. Inputs that index no such table are
    left out. The file is read without its external weights; a file that cannot be read gives nothing."""
    if not names:
        return {}
    try:
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
    except Exception:                  # pragma: no cover - unreadable: the checks that need it are skipped
        return {}
    tables = {t.name: (t.dims[0] if t.dims else None) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.t.dims:
                    tables[node.output[0]] = a.t.dims[0]
    users: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    out: dict[str, int] = {}
    for name in names:
        seen, todo, sizes = set(), [name], []
        while todo:
            v = todo.pop()
            if v in seen or len(seen) > 10_000:
                continue
            seen.add(v)
            for node in users.get(v, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == v \
                        and tables.get(node.input[0]):
                    sizes.append(int(tables[node.input[0]]))
                elif node.op_type in _PASS_THROUGH and node.input and node.input[0] == v:
                    todo.extend(node.output)
        if sizes:
            out[name] = min(sizes)
    return out


def _maybe_json(v: str) -> Any:
    if v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v
