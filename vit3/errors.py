"""The errors a user can act on, in a module of their own: the model and weight code raises them
without loading the training engine (checkpoints, run folders, locks, signals), so `import vit3` stays
light. `vit3.engine` re-exports them; `engine.run_script` turns each into an exit code.
"""


class ConfigError(ValueError):
    """A config, CLI value or checkpoint that does not fit; the message names the fix."""


class DataError(ValueError):
    """Missing, empty, inconsistent or unreadable data; the message names the fix."""


class WriteError(OSError):
    """A checkpoint or output could not be written (disk full, quota, permissions); nothing partial is left
    under a final name and what was there before is intact."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or inf."""


class SamplingDiverged(RuntimeError):
    """A sampler gave samples that are not images: NaN / inf, far outside the data's range, or flat; nothing
    was written from them."""


def load_error_text(e: BaseException) -> str:
    """What torch.load (or safetensors) found wrong with a file, as "TypeName: the first sentence".

    torch's weights_only refusal goes on to advise loading with weights_only=False, which runs whatever code the
    file holds: that advice is left out and the reason it gives kept (an unsupported pickle operand or global).
    """
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    first = (text.strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {first[:200]}"
