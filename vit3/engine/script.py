"""The `__main__` of the three scripts: exit codes a job script can act on, and no hang on the way out."""
from __future__ import annotations

import signal
import sys

from ..errors import ConfigError, DataError, SamplingDiverged, TrainingDiverged, WriteError

EXIT_DONE, EXIT_CRASH, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_WRITE_FAILED = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # a second Ctrl-C, as shells report it


def _kill_children():
    """Kill this process's children (DataLoader workers): they ignore SIGTERM, so the interpreter's exit,
    which terminates and then joins them, would wait forever."""
    import multiprocessing

    if hasattr(signal, "SIGCHLD"):  # the DataLoader's SIGCHLD handler would raise at each death
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        p.kill()


def _one_line(e: Exception) -> str:
    """The message of a bad-input error; one raised in a DataLoader worker arrives wrapped in the worker's
    traceback, whose last line is the message."""
    text = str(e)
    if "DataLoader worker process" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def run_script(main):
    """The `__main__` of train_vit.py, train_dit.py and sample.py: run main(), turn the errors a user can act
    on into one line on stderr, and exit with a code that says what happened (README, "Exit codes"):

        0 done · 1 crash (a traceback) · 2 bad input · 3 diverged (NaN / inf in training, or samples that
        are not images) · 4 stopped by a signal after saving (requeue the job) · 5 a checkpoint or output
        could not be written (disk full)
    """
    code = EXIT_CRASH
    try:
        result = main()
        code = EXIT_PREEMPTED if isinstance(result, dict) and result.get("preempted") else EXIT_DONE
    except (ConfigError, DataError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except (TrainingDiverged, SamplingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_DIVERGED
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_WRITE_FAILED
    except SystemExit as e:  # --help (code 0): the text was the output; no traceback
        code = e.code if isinstance(e.code, int) else EXIT_DONE if e.code is None else EXIT_CRASH
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted (a second Ctrl-C): stopped without a checkpoint", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _kill_children()
    sys.exit(code)
