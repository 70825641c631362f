"""What mmrepvgg.engine.hooks.LoadReadCheckpoint relies on in mmengine's runner, which has
no public way to load a checkpoint object it did not read itself: its loading function
and the flag that keeps ``Runner.load_or_resume`` from loading ``load_from`` again. Pinned
here, so an mmengine that changes either fails this file, not a user's test run."""
import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model

from mmrepvgg.engine.hooks import LoadReadCheckpoint


class Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.linear(inputs)


def _runner(tmp_path, load_from):
    return Runner(model=Toy(), work_dir=str(tmp_path), load_from=load_from,
                  default_scope='mmengine')


def test_load_or_resume_loads_nothing_once_has_loaded_is_set(tmp_path):
    missing = str(tmp_path / 'missing.pth')
    with pytest.raises(FileNotFoundError):
        _runner(tmp_path / 'a', missing).load_or_resume()
    runner = _runner(tmp_path / 'b', missing)
    runner._has_loaded = True
    runner.load_or_resume()  # skipped: the missing file is never opened


def test_load_checkpoint_to_model_takes_a_read_object_and_revises_keys():
    source, target = Toy(), Toy()
    state = {'state_dict': {f'module.{k}': v for k, v in source.state_dict().items()}}
    _load_checkpoint_to_model(target, state, strict=True, revise_keys=[(r'^module.', '')])
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(),
                                                 target.state_dict().values()))


def test_the_hook_loads_a_read_checkpoint_at_before_run(tmp_path):
    source = Toy()
    state = {'state_dict': source.state_dict(), 'meta': {}}
    runner = _runner(tmp_path, str(tmp_path / 'never-read.pth'))
    LoadReadCheckpoint(state, 'a read checkpoint').before_run(runner)
    assert runner._has_loaded
    runner.load_or_resume()  # load_from is not read again
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(),
                                                 runner.model.state_dict().values()))
