"""fp32_math: IEEE fp32 (or TF32 / bf16 products) for a block of code, through torch's
current fp32_precision settings only, and the user's settings back afterwards. The CUDA
switches can be set and read on a machine without a GPU, so both devices are checked."""
import pytest
import torch

from mmrepvgg.numerics import fp32_math, fp32_math_flags, ieee_fp32
from mmrepvgg.reparam import max_output_difference

pytestmark = pytest.mark.skipif(not hasattr(torch.backends.mkldnn, 'conv'),
                                reason='needs torch >= 2.9 (fp32_precision settings)')


def _settings():
    b = torch.backends
    return {name: owner.fp32_precision for name, owner in (
        ('cudnn.conv', b.cudnn.conv), ('cuda.matmul', b.cuda.matmul),
        ('mkldnn.conv', b.mkldnn.conv), ('mkldnn.matmul', b.mkldnn.matmul))}


@pytest.fixture
def restore_user_settings():
    before = _settings()
    yield
    b = torch.backends
    for name, value in before.items():
        owner, _, flag = name.partition('.')
        getattr(getattr(b, owner), flag).fp32_precision = value


@pytest.mark.parametrize('user', [None, 'high', 'highest'])
@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_sets_and_restores_without_raising(device, user, restore_user_settings):
    if user is not None:  # a user who set the legacy global switch before
        torch.set_float32_matmul_precision(user)
    before = _settings()
    flags = fp32_math_flags(torch.device(device))
    assert len(flags) == 2
    with fp32_math(device, 'fp32'):
        assert all(f.fp32_precision == 'ieee' for f in flags)
    assert _settings() == before
    with fp32_math(device, 'tf32'):
        fast = 'tf32' if device == 'cuda' else 'bf16'
        assert all(f.fp32_precision == fast for f in flags)
    assert _settings() == before
    with pytest.raises(RuntimeError, match='inside'):  # restored on an error too
        with fp32_math(device, 'fp32'):
            raise RuntimeError('inside')
    assert _settings() == before


def test_fusion_probes_compare_in_ieee_fp32(restore_user_settings):
    """The probe comparing two forms runs under IEEE fp32 on the model's device, whatever
    the user set (a TF32 default would let a small fusion error pass)."""
    seen = []

    class Spy(torch.nn.Linear):
        def forward(self, x):
            seen.append((torch.backends.mkldnn.conv.fp32_precision,
                         torch.backends.mkldnn.matmul.fp32_precision))
            return super().forward(x)

    torch.backends.mkldnn.conv.fp32_precision = 'bf16'
    model = Spy(4, 4)
    assert max_output_difference(model, model, torch.randn(2, 4)) == 0
    assert seen == [('ieee', 'ieee')] * 2
    assert torch.backends.mkldnn.conv.fp32_precision == 'bf16'
    with ieee_fp32(torch.nn.Identity()):  # no weights: the CPU
        assert torch.backends.mkldnn.conv.fp32_precision == 'ieee'


def test_tf32_runs_with_max_autotune_and_restores(restore_user_settings):
    """torch.compile's autotuning reads the precision settings while it compiles: with
    reduced-precision products asked for (bf16 on the CPU), it compiles and runs, and the
    user's settings come back."""
    from mmrepvgg import RepVGG, reparameterize
    from mmrepvgg.deploy import optimize_for_inference
    torch.set_float32_matmul_precision('high')
    before = _settings()
    tiny = dict(num_blocks=(1, 1, 1, 1), width_factors=(0.25, 0.25, 0.25, 0.25))
    model = reparameterize(RepVGG(tiny).eval())
    x = torch.randn(1, 3, 32, 32)
    runner = optimize_for_inference(model, x, 'cpu', mode='compile', precision='tf32',
                                    compile_mode='max-autotune')
    assert [tuple(t.shape) for t in runner(x)] == [(1, 16, 8, 8), (1, 32, 4, 4),
                                                   (1, 64, 2, 2), (1, 128, 1, 1)]
    assert _settings() == before
