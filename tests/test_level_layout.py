"""LevelLayout and the mask helpers on hand-worked batches."""
import torch

from models.level_layout import LevelLayout, downsample_mask, valid_ratio, valid_size


def padded_masks():
    """Two images in a (bs 2) batch: image 0 fills everything, image 1 is 3 of 4 columns and 1 of 2 rows
    on a 2 x 4 level, and 1 of 2 columns and 1 row on a 1 x 2 level."""
    level0 = torch.zeros(2, 2, 4, dtype=torch.bool)
    level0[1, :, 3:] = True
    level0[1, 1:, :] = True
    level1 = torch.zeros(2, 1, 2, dtype=torch.bool)
    level1[1, :, 1:] = True
    return [level0, level1]


def test_from_shapes_start_indices_and_token_count():
    layout = LevelLayout.from_shapes([(3, 5), (2, 2), (1, 3)])
    assert layout.shapes == [(3, 5), (2, 2), (1, 3)]
    assert layout.spatial_shapes.tolist() == [[3, 5], [2, 2], [1, 3]]
    assert layout.spatial_shapes.dtype == layout.level_start_index.dtype == torch.int64
    assert layout.level_start_index.tolist() == [0, 15, 19]
    assert layout.num_tokens == 22
    assert layout.padding_mask is None and layout.valid_ratios is None


def test_valid_size_and_ratio_hand_values():
    level0, level1 = padded_masks()
    assert valid_size(level0).tolist() == [[4.0, 2.0], [3.0, 1.0]]  # (columns, rows)
    assert valid_ratio(level0).tolist() == [[1.0, 1.0], [0.75, 0.5]]
    assert valid_ratio(level1).tolist() == [[1.0, 1.0], [0.5, 1.0]]


def test_from_masks_flattens_row_major_and_round_trips_per_level():
    masks = padded_masks()
    layout = LevelLayout.from_masks(masks)
    assert layout.shapes == [(2, 4), (1, 2)] and layout.num_tokens == 10
    # image 1: level 0 rows [F F F T], [T T T T], then level 1 [F T]
    assert layout.padding_mask[1].tolist() == [False, False, False, True, True, True, True, True, False, True]
    assert not bool(layout.padding_mask[0].any())
    assert layout.valid_ratios.shape == (2, 2, 2)
    assert layout.valid_ratios[1].tolist() == [[0.75, 0.5], [0.5, 1.0]]
    for level, mask in enumerate(masks):
        assert torch.equal(layout.level_padding(level), mask)


def test_from_tensors_reads_the_sizes():
    shapes = torch.tensor([[4, 6], [2, 3]])
    starts = torch.tensor([0, 24])
    layout = LevelLayout.from_tensors(shapes, starts)
    assert layout.shapes == [(4, 6), (2, 3)] and layout.num_tokens == 30
    assert layout.spatial_shapes is shapes and layout.level_start_index is starts


def test_downsample_mask_nearest():
    """A 4 x 8 image mask whose right quarter is padding, on a 2 x 4 map: nearest neighbour keeps the quarter."""
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[:, :, 6:] = True
    small = downsample_mask(mask, (2, 4))
    assert small.dtype == torch.bool
    assert small.tolist() == [[[False, False, False, True], [False, False, False, True]]]
