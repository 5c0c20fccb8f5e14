"""`CBQConfig`: every setting of a CBQ quantization run, validated when built and when read back.

The config is plain data. It is what transformers stores under `quantization_config` in `config.json`, so
`to_dict()` must stay JSON-safe (no tokenizer, tensors or dtypes) and `CBQConfig(**d)` must rebuild it.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

#: Version of the on-disk layout (packed tensors, metadata). Bumped when a saved checkpoint would be read wrongly.
FORMAT_VERSION = 1

_WEIGHT_BITS = (2, 3, 4, 8)
_ACT_BITS = (None, 4, 8)
_METHODS = ("rtn", "cbq")
_LOBCQ_CODEBOOKS = ("universal", "per_layer")
_ACTIVATION_STORAGE = ("cpu", "disk")
_CALIBRATION_DTYPES = ("float32", "bfloat16", "auto")
_ROUNDING_INITS = ("rtn", "gptq")

# Keys that only describe the run (where data came from, how it went) and are never needed to load weights.
_RUN_ONLY_KEYS = ("tokenizer",)


def _err(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"CBQConfig: invalid `{field}`={value!r}; {allowed}.")


def _check_int(field: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(field, value, "expected an integer")
    if minimum is not None and value < minimum:
        raise _err(field, value, f"expected an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise _err(field, value, f"expected an integer <= {maximum}")


def _check_float(
    field: str, value: Any, minimum: float | None = None, maximum: float | None = None, strict_min: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(field, value, "expected a finite number")
    if minimum is not None and (value < minimum or (strict_min and value == minimum)):
        raise _err(field, value, f"expected a number {'>' if strict_min else '>='} {minimum}")
    if maximum is not None and value > maximum:
        raise _err(field, value, f"expected a number <= {maximum}")


def _check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _err(field, value, "expected True or False")


class CBQConfig(QuantizationConfigMixin):
    """Settings of a `cbq_hf` quantization, passed to `from_pretrained(..., quantization_config=...)`.

    Weight format
        bits: bits per weight value: 2, 3, 4 or 8 (3-bit values are stored in 4-bit slots).
        group_size: input channels that share one scale and zero point; -1 means one group per output channel.
            When it does not divide a layer's input size the last group of each row is shorter (e.g. 576 with 128:
            four groups of 128 and one of 64). A group size larger than a layer's input size is an error.
        sym: symmetric weight grid (zero point fixed at the middle code) instead of asymmetric min-max.
        act_bits: None for weight-only; 8 or 4 for dynamic per-token symmetric quantization of the input of every
            quantized linear (a learnable clipping ratio per linear is calibrated with `method="cbq"`).
        format: "uniform" (integer grid, packed int2/int4/int8) or "lobcq" (block-clustered codebooks, W4A4).

    Calibration data
        dataset: calibration text: a list of strings, a path to a text / JSON-lines file, "wikitext2" (WikiText-2
            validation, see `cbq_hf.data`), a `datasets.Dataset`, or a `datasets` name; or pre-tokenized input: an
            integer tensor [n, seqlen] or a list of lists of token ids.
        tokenizer: tokenizer (object or name/path) used to tokenize `dataset`; used, never serialized.
        nsamples: number of calibration sequences (None: the preset's, else 128).
        seqlen: tokens per calibration sequence (BOS included when the tokenizer has one; None: the preset's, else
            512).
        seed: seed of the sampling of calibration segments and of every random initialisation.

    Calibration method
        method: "rtn" (round-to-nearest min-max, no data needed) or "cbq" (cross-block reconstruction).
        window_size: consecutive decoder blocks reconstructed jointly (1 = block-wise reconstruction).
        window_overlap: blocks shared by consecutive windows (< window_size).
        preset: a named calibration budget that sets nsamples, seqlen, epochs, batch_size, calibration_dtype,
            e2e_epochs and e2e_lr where they are not given: "fast" (minutes on a CPU for a small model),
            "balanced" (the best measured quality per minute), "gpu" (the defaults without a preset);
            docs/presets.md has their measured time and quality.
        epochs: passes over the calibration samples per window (None: the preset's, else 2).
        batch_size: calibration samples per optimisation step (None: the preset's, else 4).
        calibration_dtype: "float32", "bfloat16" (the window's matrix products in bfloat16 autocast; quantizer
            parameters, targets and the loss stay float32), or "auto" (bfloat16 where the calibration device has
            bfloat16 matrix units: AMX / AVX512-BF16 CPUs, CUDA devices with bfloat16; else float32). None: the
            preset's ("auto" for fast and balanced), else "float32".
        lr: learning rate of the rounding parameters (LoRA factors).
        lr_scale: learning rate of the step sizes and activation clipping ratios.
        lr_norm: learning rate of each decoder block's own float vector parameters (RMSNorm / LayerNorm weights and
            biases: the per-channel scales that feed the quantized linears) while its windows train, by the same
            reconstruction loss; 0 (default) leaves them as they are (after CFP / smoothing folding). They stay
            float in the checkpoint. method="cbq" only.
        e2e_epochs: passes of the end-to-end stage after the windows (`calibration/e2e.py`): every packed uniform
            linear's step sizes and activation clipping ratio trained together on the KL divergence between the
            float model's next-token distribution and the quantized model's, codes fixed; 0 skips it. None: the
            preset's (docs/presets.md) for method="cbq" with format="uniform", else 0.
        e2e_lr: Adam learning rate of that stage (on the log of each step size and on the clipping ratios; None:
            the preset's, else 3e-3). Measured on the demo model: at 64 steps 3e-3 beats 1e-3 at every setting
            tried (docs/benchmarks_quality.md, "Longer or faster end-to-end stage"); at the 16 steps of "fast",
            1e-3 beats 3e-3 (docs/presets.md).
        e2e_lr_norm: Adam learning rate of the normalisation layers' weights and biases (RMSNorm / LayerNorm) in that
            stage, trained with the steps on the same KL; 0 (default) leaves them. They stay float in the checkpoint.
        lora_rank: rank r of the LoRA-Rounding offsets V = A1 @ A2.
        rounding_init: the starting point of the rounding: "rtn" (round-to-nearest on the clip-searched grid) or
            "gptq" (GPTQ's error-compensated codes on that same grid, from each linear's input Hessian over the
            calibration tokens of its float input, K x K float32 per linear while its window runs;
            `calibration/gptq.py`; method="cbq" only; with format="lobcq": GPTQ on the starting array scales and
            codebook selectors, each value to its block codebook's nearest entry). None: "gptq" for the uniform
            format (measured better at every uniform setting, docs/benchmarks_quality.md), "rtn" for LO-BCQ.
        loss_weight_accumulated / loss_weight_homologous: weights of the two reconstruction terms
            (quantized window on X_q vs full precision on X_fp; quantized vs full precision both on X_q).
        kl_weight: weight of the KL part of each distance term (0 disables it).
        token_normalized_loss: divide each token's squared error by that token's mean square in the target (then
            multiply by the batch's median token mean square, which keeps the loss in the units of a typical token),
            so every token counts by its relative error, as the next block's RMSNorm sees it. Without it, tokens
            with massive activations (attention sinks: the first token of every sample carries ~99% of the
            hidden states' energy after SmolLM2's block 11) decide the loss of every later window. On the demo
            model it left perplexity unchanged (docs/concepts.md); off by default.
        rounding_reg_weight, beta_start, beta_end: rounding regulariser weight and its annealed exponent.
        use_cfp, cfp_lambda1, cfp_lambda2, cfp_alpha: coarse-to-fine outlier preprocessing and its parameters
            (IQR multiplier, within-set variance weight, activation smoothing exponent).
        smooth_alpha: None, an exponent in (0, 1), or "auto": smooths EVERY input channel of the linears (with
            `act_bits` set) before calibration, SmoothQuant style: channel j of the linears that share one input is
            divided by s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (max over the calibration tokens and over those
            linears' weight column j) and the weight columns multiplied by s_j, folded into the preceding norm
            where possible (else kept as `CBQLinear.input_scale`). It replaces CFP's outlier-only smoothing, moving
            part of the activations' range into the weights. "auto": per group of linears sharing an input, the
            alpha in 0.3..0.7 (or CFP's smoothing) with the smallest quantized output error on 512 calibration
            tokens. method="cbq" only (needs calibration data).
        use_lora_rounding, learn_weight_scales, learn_act_clipping, use_homologous, use_kl: ablation switches.
        moe_calibrate_all_experts: while calibrating mixture-of-experts blocks, run every calibration token through
            every expert (the router's weights unchanged: an expert's output counts only where it was chosen), so
            every expert's starting grid is set by statistics of every token; False runs each expert on its routed
            tokens only. An expert no token is routed to is packed by RTN either way (`calibration/moe.py`).
        calibration_device: device for the window being optimised ("auto": CUDA when present, else CPU).
        checkpoint_dir: folder where finished windows are written so an interrupted calibration resumes. A rerun
            with another config, data or model refuses to resume it (error naming what differs).
        activation_storage: where the calibration activations (the two streams X_q and X_fp and the window
            targets, each 4 bytes x nsamples x seqlen x hidden) live: "cpu" (memory) or "disk" (files in
            `checkpoint_dir`/streams, else a temporary folder, read and written one batch at a time).

    LO-BCQ (format="lobcq")
        lobcq_block_len: values per block (one codebook selector per block).
        lobcq_array_len: values per block array (one 8-bit scale per array).
        lobcq_num_codebooks: codebooks to choose from (a power of two).
        lobcq_codebook_bits: bits of a codebook entry (entries are signed integers).
        lobcq_codebooks: "universal" (one set for every layer, weights and activations) or "per_layer".
        lobcq_iters: maximum LO-BCQ iterations when designing codebooks.

    Other
        format_version: version of the saved layout (set by cbq_hf; a newer version than installed is refused).
        modules_to_not_convert: module names (or name suffixes) kept in full precision; embeddings are never
            converted, `lm_head` only through `lm_head_bits`. After calibration this holds the resolved list.
        lm_head_bits: None (default) keeps the output head in full precision, as the peers' numbers do; 8 or 4
            quantizes it round-to-nearest, weight-only, in groups of 128 inputs, after calibration (faster decode:
            the head is ~20% of a small model's weights). A head tied to the input embedding is untied.
        rotation: None (default) or "hadamard": before calibrating (RTN or CBQ), fold the norms into the linears and
            rotate the residual stream by a randomized Hadamard matrix, and rotate the input of every `mlp.down_proj`
            online (saved as `CBQLinear.input_hadamard`) so activation grids (W4A8, W4A4) see no outlier channels.
            Llama-shaped decoders only (llama, mistral, qwen2, qwen3), format "uniform"; a tied head is untied.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        act_bits: int | None = None,
        format: str = "uniform",
        dataset: Any = "wikitext2",
        tokenizer: Any = None,
        nsamples: int | None = None,
        seqlen: int | None = None,
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        lm_head_bits: int | None = None,
        rotation: str | None = None,
        method: str = "cbq",
        window_size: int = 2,
        window_overlap: int = 1,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float = 1e-2,
        lr_scale: float = 1e-3,
        lr_norm: float = 0.0,
        e2e_epochs: int | None = None,
        e2e_lr: float | None = None,
        e2e_lr_norm: float = 0.0,
        lora_rank: int = 5,
        loss_weight_accumulated: float = 1.0,
        loss_weight_homologous: float = 1.0,
        kl_weight: float = 1.0,
        token_normalized_loss: bool = False,
        rounding_reg_weight: float = 1e-3,
        beta_start: float = 20.0,
        beta_end: float = 2.0,
        use_cfp: bool = True,
        cfp_lambda1: float = 1.5,
        cfp_lambda2: float = 1.0,
        cfp_alpha: float = 0.5,
        smooth_alpha: float | str | None = None,
        use_lora_rounding: bool = True,
        learn_weight_scales: bool = True,
        learn_act_clipping: bool = True,
        use_homologous: bool = True,
        use_kl: bool = True,
        moe_calibrate_all_experts: bool = True,
        calibration_device: str = "auto",
        checkpoint_dir: str | None = None,
        activation_storage: str = "cpu",
        lobcq_block_len: int = 8,
        lobcq_array_len: int = 64,
        lobcq_num_codebooks: int = 16,
        lobcq_codebook_bits: int = 6,
        lobcq_codebooks: str = "universal",
        lobcq_iters: int = 20,
        format_version: int = FORMAT_VERSION,
        preset: str | None = None,
        calibration_dtype: str | None = None,
        rounding_init: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = "cbq"
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.act_bits = act_bits
        self.format = format
        self.dataset = dataset
        self.tokenizer = tokenizer
        from .presets import resolve

        budget = resolve(
            preset,
            dict(
                nsamples=nsamples,
                seqlen=seqlen,
                epochs=epochs,
                batch_size=batch_size,
                calibration_dtype=calibration_dtype,
                e2e_epochs=e2e_epochs,
                e2e_lr=e2e_lr,
            ),
        )
        self.preset = preset
        self.nsamples, self.seqlen = budget["nsamples"], budget["seqlen"]
        self.seed = seed
        if isinstance(modules_to_not_convert, (list, tuple)):
            modules_to_not_convert = list(modules_to_not_convert)
        self.modules_to_not_convert = modules_to_not_convert
        self.lm_head_bits = lm_head_bits
        self.rotation = rotation
        self.method = method
        self.window_size = window_size
        self.window_overlap = window_overlap
        self.epochs, self.batch_size = budget["epochs"], budget["batch_size"]
        self.calibration_dtype = budget["calibration_dtype"]
        self.lr = lr
        self.lr_scale = lr_scale
        self.lr_norm = lr_norm
        # The GPTQ start and the end-to-end stage exist for CBQ on the uniform grid only: elsewhere None means off.
        cbq_uniform = method == "cbq" and format == "uniform"
        self.e2e_epochs = e2e_epochs if e2e_epochs is not None else (budget["e2e_epochs"] if cbq_uniform else 0)
        self.e2e_lr = budget["e2e_lr"]
        self.e2e_lr_norm = e2e_lr_norm
        self.lora_rank = lora_rank
        self.rounding_init = rounding_init if rounding_init is not None else ("gptq" if cbq_uniform else "rtn")
        self.loss_weight_accumulated = loss_weight_accumulated
        self.loss_weight_homologous = loss_weight_homologous
        self.kl_weight = kl_weight
        self.token_normalized_loss = token_normalized_loss
        self.rounding_reg_weight = rounding_reg_weight
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.use_cfp = use_cfp
        self.cfp_lambda1 = cfp_lambda1
        self.cfp_lambda2 = cfp_lambda2
        self.cfp_alpha = cfp_alpha
        self.smooth_alpha = smooth_alpha
        self.use_lora_rounding = use_lora_rounding
        self.learn_weight_scales = learn_weight_scales
        self.learn_act_clipping = learn_act_clipping
        self.use_homologous = use_homologous
        self.use_kl = use_kl
        self.moe_calibrate_all_experts = moe_calibrate_all_experts
        self.calibration_device = calibration_device
        self.checkpoint_dir = checkpoint_dir
        self.activation_storage = activation_storage
        self.lobcq_block_len = lobcq_block_len
        self.lobcq_array_len = lobcq_array_len
        self.lobcq_num_codebooks = lobcq_num_codebooks
        self.lobcq_codebook_bits = lobcq_codebook_bits
        self.lobcq_codebooks = lobcq_codebooks
        self.lobcq_iters = lobcq_iters
        self.format_version = format_version
        # Facts recorded by the quantizer after calibration (bits per weight, perplexity, ...): JSON-safe only.
        self.run_info: dict[str, Any] = dict(kwargs.pop("run_info", None) or {})
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(
                f"CBQConfig: unknown field(s) {sorted(kwargs)}; see `help(cbq_hf.CBQConfig)` for the accepted fields."
            )
        self.post_init()

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Check every field; raise `ValueError` naming the field and the allowed values."""
        if self.bits not in _WEIGHT_BITS or isinstance(self.bits, bool):
            raise _err("bits", self.bits, f"allowed: {list(_WEIGHT_BITS)}")
        _check_int("group_size", self.group_size)
        if self.group_size != -1 and self.group_size < 1:
            raise _err("group_size", self.group_size, "expected -1 (per output channel) or a positive integer")
        _check_bool("sym", self.sym)
        if self.act_bits not in _ACT_BITS or isinstance(self.act_bits, bool):
            raise _err("act_bits", self.act_bits, "allowed: None (weight-only), 8 or 4")
        from .formats import registered_formats

        if self.format not in registered_formats():
            raise _err("format", self.format, f"allowed: {registered_formats()}")
        if self.method not in _METHODS:
            raise _err("method", self.method, f"allowed: {list(_METHODS)}")
        self._check_dataset()
        if self.calibration_dtype not in _CALIBRATION_DTYPES:
            raise _err("calibration_dtype", self.calibration_dtype, f"allowed: {list(_CALIBRATION_DTYPES)}")
        _check_int("nsamples", self.nsamples, 1)
        _check_int("seqlen", self.seqlen, 2)
        _check_int("seed", self.seed, 0)
        if self.modules_to_not_convert is not None and not (
            isinstance(self.modules_to_not_convert, list)
            and all(isinstance(m, str) and m for m in self.modules_to_not_convert)
        ):
            raise _err("modules_to_not_convert", self.modules_to_not_convert, "expected a list of module names")
        if self.lm_head_bits not in (None, 8, 4) or isinstance(self.lm_head_bits, bool):
            raise _err("lm_head_bits", self.lm_head_bits, "allowed: None (full-precision head), 8 or 4")
        if self.rotation not in (None, "hadamard"):
            raise _err("rotation", self.rotation, "allowed: None or 'hadamard'")
        if self.rotation is not None and self.format != "uniform":
            raise ValueError(
                f"CBQConfig: rotation={self.rotation!r} is implemented for format='uniform' (its calibration stand-in "
                f"applies the online Hadamard); format={self.format!r} has none. Use rotation=None."
            )
        _check_int("window_size", self.window_size, 1)
        _check_int("window_overlap", self.window_overlap, 0)
        if self.window_overlap >= self.window_size:
            raise ValueError(
                f"CBQConfig: `window_overlap`={self.window_overlap} must be smaller than `window_size`="
                f"{self.window_size} (windows advance by window_size - window_overlap blocks)."
            )
        _check_int("epochs", self.epochs, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_float("lr", self.lr, 0.0)
        _check_float("lr_scale", self.lr_scale, 0.0)
        _check_float("lr_norm", self.lr_norm, 0.0)
        _check_int("e2e_epochs", self.e2e_epochs, 0)
        _check_float("e2e_lr", self.e2e_lr, 0.0)
        _check_float("e2e_lr_norm", self.e2e_lr_norm, 0.0)
        _check_int("lora_rank", self.lora_rank, 1)
        if self.rounding_init not in _ROUNDING_INITS:
            raise _err("rounding_init", self.rounding_init, f"allowed: {list(_ROUNDING_INITS)}")
        if self.rounding_init == "gptq" and self.method != "cbq":
            raise ValueError(
                f"CBQConfig: rounding_init='gptq' starts CBQ's rounding from GPTQ's codes; it needs method='cbq' "
                f"(got method={self.method!r})."
            )
        for name in (
            "loss_weight_accumulated",
            "loss_weight_homologous",
            "kl_weight",
            "rounding_reg_weight",
            "cfp_lambda2",
        ):
            _check_float(name, getattr(self, name), 0.0)
        _check_float("beta_start", self.beta_start, 0.0, strict_min=True)
        _check_float("beta_end", self.beta_end, 0.0, strict_min=True)
        _check_float("cfp_lambda1", self.cfp_lambda1, 0.0)
        _check_float("cfp_alpha", self.cfp_alpha, 0.0, 1.0)
        if self.smooth_alpha is not None:
            if self.smooth_alpha != "auto":
                _check_float("smooth_alpha", self.smooth_alpha, 0.0, 1.0, strict_min=True)
                if self.smooth_alpha == 1.0:
                    raise _err("smooth_alpha", self.smooth_alpha, "expected a number in (0, 1), 'auto' or None")
            if self.act_bits is None:
                raise ValueError(
                    "CBQConfig: `smooth_alpha` smooths activations for activation quantization, but act_bits=None "
                    "(weight-only); set act_bits (e.g. 4 or 8) or leave smooth_alpha=None."
                )
            if self.method != "cbq":
                raise ValueError(
                    f"CBQConfig: `smooth_alpha` needs calibration activations, which method={self.method!r} does not "
                    f"collect; use method='cbq' or leave smooth_alpha=None."
                )
        if self.lr_norm > 0 and self.method != "cbq":
            raise ValueError(
                f"CBQConfig: `lr_norm`={self.lr_norm} trains the blocks' norm weights during CBQ calibration, which "
                f"method={self.method!r} does not run; use method='cbq' or leave lr_norm=0."
            )
        for name in (
            "use_cfp",
            "use_lora_rounding",
            "learn_weight_scales",
            "learn_act_clipping",
            "use_homologous",
            "use_kl",
            "token_normalized_loss",
            "moe_calibrate_all_experts",
        ):
            _check_bool(name, getattr(self, name))
        if not isinstance(self.calibration_device, str) or not self.calibration_device:
            raise _err("calibration_device", self.calibration_device, "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise _err("checkpoint_dir", self.checkpoint_dir, "expected a folder path or None")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        if self.activation_storage not in _ACTIVATION_STORAGE:
            raise _err("activation_storage", self.activation_storage, f"allowed: {list(_ACTIVATION_STORAGE)}")
        _check_int("lobcq_block_len", self.lobcq_block_len, 1)
        _check_int("lobcq_array_len", self.lobcq_array_len, 1)
        if self.lobcq_array_len % self.lobcq_block_len:
            raise ValueError(
                f"CBQConfig: `lobcq_array_len`={self.lobcq_array_len} must be a multiple of `lobcq_block_len`="
                f"{self.lobcq_block_len} (a block array is made of whole blocks)."
            )
        _check_int("lobcq_num_codebooks", self.lobcq_num_codebooks, 1, 256)
        if self.lobcq_num_codebooks & (self.lobcq_num_codebooks - 1):
            raise _err("lobcq_num_codebooks", self.lobcq_num_codebooks, "expected a power of two between 1 and 256")
        _check_int("lobcq_codebook_bits", self.lobcq_codebook_bits, 4, 8)
        if self.lobcq_codebooks not in _LOBCQ_CODEBOOKS:
            raise _err("lobcq_codebooks", self.lobcq_codebooks, f"allowed: {list(_LOBCQ_CODEBOOKS)}")
        _check_int("lobcq_iters", self.lobcq_iters, 1)
        _check_int("format_version", self.format_version, 1)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"CBQConfig: checkpoint format_version={self.format_version} is newer than this cbq_hf "
                f"understands ({FORMAT_VERSION}); upgrade cbq_hf (`pip install -U cbq_hf`)."
            )
        # Combinations.
        if self.format == "lobcq":
            if self.bits != 4:
                raise ValueError(
                    f"CBQConfig: format='lobcq' stores 4-bit codebook indices; `bits` must be 4 (got {self.bits})."
                )
            if self.act_bits not in (None, 4):
                raise ValueError(
                    f"CBQConfig: format='lobcq' encodes activations with the same 4-bit codebooks; `act_bits` must"
                    f" be 4 (W4A4) or None (weight-only), got {self.act_bits}."
                )
        if not isinstance(self.run_info, dict):
            raise _err("run_info", self.run_info, "expected a dict")

    def _check_dataset(self) -> None:
        d = self.dataset
        if d is None:
            return
        if isinstance(d, (str, os.PathLike)):
            if not os.fspath(d).strip():
                raise _err("dataset", d, "expected a non-empty name or path")
            return
        from .data import check_token_ids, is_token_ids

        if is_token_ids(d):  # pre-tokenized: an integer tensor [n, L] or lists of token ids
            check_token_ids(d)
            return
        if isinstance(d, (list, tuple)):
            if not d:
                raise _err("dataset", "[]", "the list of calibration texts is empty")
            if not all(isinstance(t, str) for t in d):
                raise _err("dataset", type(d[0]).__name__, "a list of calibration texts must contain only strings")
            return
        # A `datasets.Dataset` (duck-typed so importing the config does not import `datasets`).
        if hasattr(d, "column_names") and hasattr(d, "__getitem__"):
            return
        raise _err(
            "dataset",
            type(d).__name__,
            "expected a list of strings, a text/JSON-lines path, 'wikitext2', a datasets.Dataset, a name, or token "
            "ids (an integer tensor [n, seqlen] or a list of lists of ints)",
        )

    # ------------------------------------------------------------------ derived facts
    def has_input_scale(self) -> bool:
        """Whether the quantized linears of this config carry an explicit per-input-channel smoothing scale (CBQ
        with CFP or smooth_alpha, in a format that applies one)."""
        from .formats import format_class

        smoothing = self.use_cfp or self.smooth_alpha is not None
        return self.method == "cbq" and smoothing and format_class(self.format).supports_input_scale

    @property
    def slot_bits(self) -> int:
        """Bits of the storage slot of one weight value (3-bit values use 4-bit slots)."""
        return 4 if self.bits == 3 else self.bits

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the tokenizer is dropped and an in-memory dataset is replaced by a short description."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key in _RUN_ONLY_KEYS:
                continue
            out[key] = copy.deepcopy(value) if key != "dataset" else _describe_dataset(value)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the fields whose values differ from a default `CBQConfig()` (plus `quant_method`), as transformers'
        configs define it."""
        defaults = CBQConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or defaults.get(k, object()) != v}

    def __iter__(self):
        yield from self.to_dict().items()

    def loading_signature(self) -> dict[str, Any]:
        """The fields that decide the shapes of the saved tensors (used to check a checkpoint against its config)."""
        from .formats import format_class

        keys = ["format", "bits", "group_size", "sym", "act_bits", "format_version"]
        keys += list(format_class(self.format).layout_fields)
        if self.lm_head_bits is not None:  # only then: checkpoints saved before the field existed keep matching
            keys.append("lm_head_bits")
        if self.rotation is not None:  # likewise; the skeleton of a rotated checkpoint has input_hadamard buffers
            keys.append("rotation")
        return {k: getattr(self, k) for k in keys}


def _describe_dataset(d: Any) -> Any:
    if d is None or isinstance(d, str):
        return d
    if isinstance(d, os.PathLike):
        return os.fspath(d)
    if hasattr(d, "shape") and hasattr(d, "dtype"):
        return f"<token ids {list(d.shape)}>"
    if isinstance(d, (list, tuple)):
        if d and not isinstance(d[0], str):
            return f"<token ids [{len(d)}, {len(d[0])}]>"
        return f"<{len(d)} in-memory texts>"
    name = getattr(getattr(d, "info", None), "dataset_name", None) or type(d).__name__
    return f"<datasets.Dataset {name}, {len(d) if hasattr(d, '__len__') else '?'} rows>"
