"""Torch buffers that jtkd recomputes instead of loading (registry derived_buffers) equal torch's."""

import numpy as np
import torchvision

from jtkd.models import swin


def test_swin_buffers_match_torch():
    for builder, window in ((torchvision.models.swin_t, 7), (torchvision.models.swin_v2_t, 8)):
        attn = builder(weights=None).features[1][1].attn
        want = attn.relative_position_index.numpy()
        np.testing.assert_array_equal(swin.relative_position_index(window, window), want)
        if hasattr(attn, "relative_coords_table"):
            np.testing.assert_allclose(
                swin.relative_coords_table(window, window), attn.relative_coords_table.numpy(), atol=1e-7, rtol=0
            )


def test_maxvit_relative_position_index_matches_torch():
    attn = torchvision.models.maxvit_t(weights=None).blocks[0].layers[0].layers.window_attention.attn_layer[1]
    np.testing.assert_array_equal(swin.relative_position_index(7, 7), attn.relative_position_index.numpy().reshape(-1))
