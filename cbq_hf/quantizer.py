"""`CBQHfQuantizer`: the transformers hooks, nothing else.

- Full-precision checkpoint + `CBQConfig`: transformers loads the float weights, then
  `_process_model_after_weight_loading` runs calibration (RTN or CBQ) and swaps the decoder linears for
  `CBQLinear` modules. With an accelerate `device_map` (blocks on "cpu"/"disk"), calibration loads one window of
  blocks at a time and puts the frozen blocks back (`calibration/offload.py`, docs/scale_out.md).
- Saved cbq checkpoint: `_process_model_before_weight_loading` verifies the files and builds empty `CBQLinear`
  modules on the meta device, so the packed tensors load straight into them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer

from .config import FORMAT_VERSION, CBQConfig
from .formats import get_format
from .hub import install_save_hooks
from .lm_head import empty_lm_head, quantize_lm_head
from .modeling import (
    add_init_stub,
    conv1d_to_linear,
    empty_cbq_experts,
    empty_cbq_linear,
    find_decoder_blocks,
    quantizable_experts,
    quantizable_linears,
    remove_init_stubs,
    set_module,
)
from .nn.experts import CBQExperts
from .nn.linear import CBQLinear

logger = logging.getLogger(__name__)


class CBQHfQuantizer(HfQuantizer):
    """Transformers quantizer for `quant_method="cbq"` (see module docstring)."""

    requires_calibration = False
    quantization_config: CBQConfig

    def __init__(self, quantization_config: CBQConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        #: The CBQ engine's report of the last calibration (windows with start/end loss), None for RTN/loading.
        self.calibration_report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ environment
    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        """Nothing to refuse: calibration runs with any accelerate `device_map` ("cpu"/"disk" offload included,
        see `calibration/offload.py`); a saved cbq checkpoint loads like any transformers model."""

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    # ------------------------------------------------------------------ before loading
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        cfg = self.quantization_config
        if model.__class__.main_input_name != "input_ids":
            raise ValueError(
                f"cbq_hf quantizes text models (main input `input_ids`); {type(model).__name__} is not one."
            )
        find_decoder_blocks(model)  # clear error early for models without decoder blocks
        if cfg.modules_to_not_convert is None:
            cfg.modules_to_not_convert = list(self.get_modules_to_not_convert(model))
        if not self.pre_quantized:
            return model
        fmt = get_format(cfg)
        expected: dict[str, tuple[int, ...]] = {}
        if cfg.rotation is not None:  # a rotated checkpoint: every block's down_proj rotates its input online
            from .rotation import mark_online_hadamard

            mark_online_hadamard(model)
        for name, lin in quantizable_linears(model, cfg.modules_to_not_convert).items():
            q = empty_cbq_linear(lin, fmt, cfg.has_input_scale(), device="meta", name=name)
            if isinstance(lin, Conv1D):  # GPT-2's _init_weights reads c_proj.weight while loading
                add_init_stub(q)
            set_module(model, name, q)
            for buf, (shape, _) in fmt.buffer_specs(q.out_features, q.in_features).items():
                expected[f"{name}.{buf}"] = shape
            if q.input_hadamard is not None:
                expected[f"{name}.input_hadamard"] = (1,)
        for name, experts in quantizable_experts(model, cfg.modules_to_not_convert).items():
            q = empty_cbq_experts(experts, fmt, device="meta", name=name)
            set_module(model, name, q)
            for rel, lin in q.expert_linears().items():
                for buf, (shape, _) in fmt.buffer_specs(lin.out_features, lin.in_features).items():
                    expected[f"{name}.{rel}.{buf}"] = shape
        if cfg.lm_head_bits is not None:
            expected.update(empty_lm_head(model, cfg.lm_head_bits))
        from transformers.conversion_mapping import get_model_conversion_mapping

        from .serialization import verify_checkpoint

        # The transforms transformers will apply to the checkpoint's names when it loads them (renamed heads,
        # MoE blocks renamed, float experts fused), computed on the skeleton holding the quantized modules.
        conversions = get_model_conversion_mapping(model)
        verify_checkpoint(checkpoint_files or [], expected, cfg.loading_signature(), conversions)
        return model

    def preprocess_model(self, model, dtype=None, **kwargs: Any):
        """transformers' hook around `_process_model_before_weight_loading`; for a saved checkpoint it then lets
        transformers skip the load guard saved under each quantized linear's `weight` name (see
        `serialization.load_guards`)."""
        super().preprocess_model(model, dtype=dtype, **kwargs)
        if self.pre_quantized:
            from .serialization import guarded_linears, ignore_expert_guards, ignore_load_guards

            ignore_load_guards(model, guarded_linears(model))
            ignore_expert_guards(model)

    # ------------------------------------------------------------------ after loading
    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        cfg = self.quantization_config
        if not self.pre_quantized:
            start = time.perf_counter()
            self._calibrate(model)
            if cfg.lm_head_bits is not None:
                quantize_lm_head(model, cfg.lm_head_bits)
            cfg.run_info.update(self._summary(model))
            cfg.run_info["calibration_seconds"] = round(time.perf_counter() - start, 2)
            cfg.run_info.setdefault(
                "base_model", getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
            )
        else:
            remove_init_stubs(model)
            self._check_loaded(model)
        cfg.format_version = FORMAT_VERSION
        install_save_hooks(model)
        return model

    def _calibrate(self, model) -> None:
        cfg = self.quantization_config
        fmt = get_format(cfg)
        from .calibration.rtn import quantize_rtn
        from .rotation import apply_rotation

        apply_rotation(model, cfg)  # CBQConfig(rotation=...): before RTN or CBQ, on the float model
        if cfg.method == "rtn":
            quantize_rtn(model, fmt, cfg.modules_to_not_convert)  # block by block, offloaded models included
            return
        # CBQ calibration trains [out, in] linear weights: GPT-2's Conv1D layers become nn.Linear first.
        conv1d_to_linear(model, list(quantizable_linears(model, cfg.modules_to_not_convert)))
        from .calibration.engine import calibrate
        from .data import get_calibration_batches

        tokenizer = cfg.tokenizer
        if tokenizer is None or isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            source = tokenizer or getattr(model, "name_or_path", None)
            if not source:
                raise ValueError(
                    "CBQConfig: `tokenizer` is required for method='cbq' (pass the tokenizer object or its name/path)."
                )
            tokenizer = AutoTokenizer.from_pretrained(source)
        input_ids = get_calibration_batches(cfg.dataset, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
        # Per-window losses (CLI summary / plot); fused experts are calibrated with their blocks (calibration/moe.py).
        self.calibration_report = calibrate(model, cfg, input_ids)

    def _summary(self, model) -> dict[str, Any]:
        linears = [m for m in model.modules() if isinstance(m, CBQLinear)]
        bits = sum(
            m.fmt.bits_per_weight(m.out_features, m.in_features) * m.out_features * m.in_features for m in linears
        )
        weights = sum(m.out_features * m.in_features for m in linears)
        experts = sum(isinstance(m, CBQExperts) for m in model.modules())
        return {
            "quantized_linears": len(linears),  # every packed matrix, the per-expert ones included
            "quantized_experts_modules": experts,
            "bits_per_weight": round(bits / weights, 4) if weights else None,
        }

    def _check_loaded(self, model) -> None:
        for name, m in model.named_modules():
            if isinstance(m, CBQLinear):
                for buf, t in m.packed_buffers().items():
                    if t.device.type == "meta":
                        raise ValueError(
                            f"cbq_hf: tensor {name}.{buf} was not loaded from the checkpoint; the "
                            f"checkpoint is incomplete."
                        )

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model):
        import json

        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        from .serialization import (
            META_CHECKSUMS,
            META_CONFIG,
            META_VERSION,
            checksum_metadata,
            expert_load_guards,
            guarded_linears,
            load_guards,
        )

        state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
        guards = {**load_guards(guarded_linears(model)), **expert_load_guards(model)}
        clash = sorted(set(guards) & set(state_dict))
        if clash:
            raise ValueError(f"cbq_hf: the load guard {clash[0]} would replace a tensor of the model's state dict.")
        state_dict.update(guards)  # a loader without cbq_hf refuses the checkpoint (serialization.load_guards)
        on_meta = [k for k, v in state_dict.items() if v.device.type == "meta"]
        if on_meta:
            raise ValueError(
                f"cbq_hf: refusing to save {on_meta[0]} (and {len(on_meta) - 1} more): it is on the meta "
                f"device (offloaded, not loaded), so its values are unknown. Save a model whose "
                f"weights are all in memory (cbq_hf materialises offloaded weights after calibration)."
            )
        bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"cbq_hf: refusing to save non-finite values (NaN/inf) in {bad[:3]}.")
        meta = {
            META_VERSION: str(FORMAT_VERSION),
            META_CHECKSUMS: checksum_metadata(state_dict),
            META_CONFIG: json.dumps(self.quantization_config.loading_signature(), sort_keys=True),
        }
        return state_dict, meta

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True
