from __future__ import annotations

import torch
import torch.nn.functional as F

from retinaflow.model.fpn import FPN


def _features(batch: int = 2, h: int = 128, w: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, h // s, w // s, generator=g) for c, s in ((16, 8), (24, 16), (40, 32))]


def test_shapes_p3_to_p7() -> None:
    fpn = FPN((16, 24, 40), out_channels=32)
    outs = fpn(_features())
    assert [tuple(p.shape) for p in outs] == [(2, 32, 128 // s, 256 // s) for s in (8, 16, 32, 64, 128)]
    assert fpn.out_channels == 32 and fpn.strides == (8, 16, 32, 64, 128)


def test_top_down_path_and_extra_levels() -> None:
    fpn = FPN((16, 24, 40), out_channels=8)
    c3, c4, c5 = _features(1)
    base = fpn([c3, c4, c5])
    with torch.no_grad():
        # P6 is a stride-2 conv on C5 and P7 a stride-2 conv on relu(P6)
        torch.testing.assert_close(base[3], fpn.p6(c5))
        torch.testing.assert_close(base[4], fpn.p7(F.relu(base[3])))
        # P5 = output conv of the C5 lateral alone
        torch.testing.assert_close(base[2], fpn.output5(fpn.lateral5(c5)))
        # P4 adds the nearest-upsampled P5 lateral to its own lateral
        top_down = fpn.lateral4(c4) + fpn.lateral5(c5).repeat_interleave(2, -1).repeat_interleave(2, -2)
        torch.testing.assert_close(base[1], fpn.output4(top_down))
    # C5 reaches P3 through the top-down path; C3 does not reach the coarser levels
    changed_c5 = fpn([c3, c4, c5 + 1.0])
    assert not torch.allclose(changed_c5[0], base[0])
    changed_c3 = fpn([c3 + 1.0, c4, c5])
    for level in range(1, 5):
        torch.testing.assert_close(changed_c3[level], base[level])


def test_odd_sizes_line_up() -> None:
    fpn = FPN((4, 4, 4), out_channels=4)
    feats = [torch.randn(1, 4, 13, 9), torch.randn(1, 4, 7, 5), torch.randn(1, 4, 4, 3)]
    outs = fpn(feats)
    assert [tuple(p.shape[-2:]) for p in outs] == [(13, 9), (7, 5), (4, 3), (2, 2), (1, 1)]
