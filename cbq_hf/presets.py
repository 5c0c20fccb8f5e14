"""Named calibration budgets (`CBQConfig(preset=...)`, `cbq-hf quantize --preset`), and the duration estimate
printed before a long calibration.

A preset sets the fields below unless they are given explicitly. Measured time and quality on the demo model:
docs/presets.md (`benchmarks/presets.py`).
"""

from __future__ import annotations

#: Name -> the fields it sets. "fast" finishes the demo model in minutes on two CPU cores; "balanced" is the
#: budget of the best measured W4A16 row; "gpu" is the budget for GPU runs (also the defaults without a preset).
#: The CPU presets train in bfloat16 autocast where the CPU has bfloat16 matrix units ("auto": the same perplexity
#: as float32 on the demo model's balanced W4A16 run, docs/presets.md); "gpu" keeps float32 until measured there.
#: e2e_epochs (the end-to-end stage, CBQ on the uniform grid only) is sized in full-model steps: 16 for fast, 64
#: for balanced and gpu (e2e_epochs x nsamples / batch_size); e2e_lr goes with that count (measured on the demo
#: model: 3e-3 better than 1e-3 at 64 steps, worse at 16).
PRESETS: dict[str, dict[str, int | float | str]] = {
    "fast": dict(nsamples=32, seqlen=256, epochs=2, batch_size=2, calibration_dtype="auto", e2e_epochs=1, e2e_lr=1e-3),
    "balanced": dict(
        nsamples=32, seqlen=256, epochs=4, batch_size=2, calibration_dtype="auto", e2e_epochs=4, e2e_lr=3e-3
    ),
    "gpu": dict(
        nsamples=128, seqlen=512, epochs=2, batch_size=4, calibration_dtype="float32", e2e_epochs=2, e2e_lr=3e-3
    ),
}
#: The fields' values when neither a preset nor the field is given.
DEFAULT_PRESET = "gpu"


def resolve(preset: str | None, explicit: dict[str, int | float | str | None]) -> dict[str, int | float | str]:
    """The fields a preset sets: each explicit (non-None) value, else the preset's, else the default preset's.

    Raises:
        ValueError: `preset` is not a known name.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"CBQConfig: `preset`={preset!r} is not a preset; choose one of {sorted(PRESETS)} or None.")
    chosen = PRESETS[preset or DEFAULT_PRESET]
    return {k: chosen[k] if explicit.get(k) is None else explicit[k] for k in chosen}


def token_steps(config) -> int:
    """Calibration tokens processed per window (epochs x nsamples x seqlen): what a window's time scales with."""
    return config.epochs * config.nsamples * config.seqlen


def estimate_message(config, seconds_per_window: float, windows_left: int, num_blocks: int | None = None) -> str:
    """One line: the estimated remaining time of the windows, of the end-to-end stage when it runs, and per preset
    with a smaller budget, its estimate.

    Args:
        config: the run's `CBQConfig`.
        seconds_per_window: wall time of the first window (s).
        windows_left: windows still to run.
        num_blocks: decoder blocks of the model; with it, the end-to-end stage is estimated too (a full-model step
            costs about num_blocks / window_size window steps on the same tokens), else only its steps are named.
    """
    left = seconds_per_window * windows_left
    own = _budget(config)
    faster = []
    for name, fields in PRESETS.items():
        ratio = fields["epochs"] * fields["nsamples"] * fields["seqlen"] / max(token_steps(config), 1)
        if ratio < 0.999:
            # the preset's stage runs where this run's does (CBQ on the uniform grid, not switched off)
            stage = _e2e_seconds(config, seconds_per_window, num_blocks, fields) if own["e2e_epochs"] else 0.0
            faster.append(f"preset {name!r} ~{_minutes(left * ratio + (stage or 0.0))}")
    hint = f"; faster: {', '.join(faster)}" if faster else ""
    steps = e2e_steps(own)
    then = ""
    if steps:
        stage = _e2e_seconds(config, seconds_per_window, num_blocks, own)
        then = f", then the end-to-end stage ({steps} full-model steps"
        then += ")" if stage is None else f", ~{_minutes(stage)}): ~{_minutes(left + stage)} in all"
    return (
        f"calibration: ~{_minutes(left)} left for {windows_left} windows ({seconds_per_window:.0f} s each){then}{hint}"
    )


def estimated_seconds(config, seconds_per_window: float, windows_left: int, num_blocks: int | None = None) -> float:
    """The estimated remaining calibration time (s): the windows left, plus the end-to-end stage when it runs and
    `num_blocks` is known."""
    own = _budget(config)
    stage = _e2e_seconds(config, seconds_per_window, num_blocks, own) if own["e2e_epochs"] else 0.0
    return seconds_per_window * windows_left + (stage or 0.0)


def _e2e_seconds(config, seconds_per_window: float, num_blocks: int | None, fields) -> float | None:
    """The end-to-end stage's time for the budget `fields`, from this run's window time: a window step (the
    window's float runs and GPTQ start spread over its steps) scaled by the tokens per step and by the blocks a
    full-model step runs (num_blocks / window_size windows). None without `num_blocks`."""
    if num_blocks is None:
        return None
    window_step = seconds_per_window / max(config.epochs * _batches(_budget(config)), 1)
    tokens = fields["batch_size"] * fields["seqlen"] / (config.batch_size * config.seqlen)
    return e2e_steps(fields) * window_step * tokens * num_blocks / config.window_size


def e2e_steps(fields) -> int:
    """Optimizer steps of the end-to-end stage: e2e_epochs x batches per epoch (`fields`: a preset or a config's
    budget fields)."""
    return int(fields.get("e2e_epochs", 0) or 0) * _batches(fields)


def _batches(fields) -> int:
    """Batches per epoch: ceil(nsamples / batch_size)."""
    return -(-int(fields["nsamples"]) // int(fields["batch_size"]))


def _budget(config) -> dict:
    """A config's budget fields, in the form of a preset's."""
    return {k: getattr(config, k) for k in ("nsamples", "seqlen", "epochs", "batch_size", "e2e_epochs")}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
