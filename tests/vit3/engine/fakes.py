"""Stand-ins the engine tests share: an Accelerator of one process, a Run, a tiny model and a checkpoint of it."""
import types

import torch
import torch.nn as nn

from vit3 import engine as T


class OneProcess:
    """What save/load_checkpoint need from an Accelerator, for one process."""
    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


class CPU(OneProcess):
    """OneProcess on the CPU: what a Checkpointer needs."""
    device = torch.device("cpu")


def fake_run(tmp_path, resume_from=None):
    """What a Checkpointer reads of a Run."""
    return types.SimpleNamespace(accelerator=CPU(), dir=tmp_path, resume_from=resume_from)


def save_step(root, step, model=None, keep_last=3, **state):
    """A checkpoint of step `step` (a tiny model unless given) in root."""
    return T.save_checkpoint(OneProcess(), root, step, modules={"model": model or tiny_model()}, states={},
                             trainer_state={"global_step": step, **state}, config={}, keep_last=keep_last)
