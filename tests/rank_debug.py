"""Run a trainer's main() and write what this process ended with to RUN/debug/rank<r>.json: the weights
digests of the model and the EMA (and of REPA's projector), the step, and this process's own train metrics
before the all-reduce.
The two-process tests launch this under `accelerate launch` and compare the ranks' files.

    accelerate launch tests/rank_debug.py train_vit.py key=value ...
"""
import json
import sys
from pathlib import Path

# the repository root before this folder (sys.path[0] when run as a script), whose vit3/ and dit3/ are the
# test packages (tests/vit3/...), not the library
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.trainer_helpers import load_script, weights_digest  # noqa: E402

if __name__ == "__main__":
    from accelerate import PartialState

    script, argv = sys.argv[1], sys.argv[2:]
    result = load_script(Path(script).stem).main(argv)
    state = PartialState()
    debug = Path(result["run_dir"]) / "debug"
    debug.mkdir(parents=True, exist_ok=True)
    (debug / f"rank{state.process_index}.json").write_text(json.dumps({
        "rank": state.process_index, "world_size": state.num_processes, "step": result["step"],
        "model_digest": weights_digest(result["model"]),
        "ema_digest": weights_digest(result["ema"]) if result["ema"] is not None else None,
        "local_train": result["local_train"],
        **({"repa_projector_digest": weights_digest(result["repa_projector"])}
           if result.get("repa_projector") is not None else {})}, indent=2))
