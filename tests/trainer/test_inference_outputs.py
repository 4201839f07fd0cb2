"""KITTI label lines and drawn images: what inference writes for each image."""
from __future__ import annotations

import pytest
from PIL import Image

from deformable_detr.data.visualize import (
    DEFAULT_PALETTE, Detection, class_colors, draw_detections, kitti_line, save_image, write_kitti_labels)
from deformable_detr.errors import UsageError


def test_kitti_line_is_taos_sixteen_fields_with_three_decimals():
    line = kitti_line(Detection("car", (10.0, 20.5, 110.2504, 80.0), 0.87654))
    assert line == "car 0.00 0 0.00 10.000 20.500 110.250 80.000 0.00 0.00 0.00 0.00 0.00 0.00 0.00 0.877"
    assert len(line.split()) == 16


def test_kitti_box_is_written_as_predicted_not_clipped():
    # TAO writes the box the model predicts, also where it leaves the image.
    line = kitti_line(Detection("person", (-5.0, -1.25, 700.0625, 500.0), 0.5))
    assert line.split()[4:8] == ["-5.000", "-1.250", "700.062", "500.000"]


def test_a_class_name_with_spaces_keeps_sixteen_fields():
    # Deliberately unlike TAO (whose line then has 17 fields): the spaces become underscores.
    line = kitti_line(Detection("potted plant", (1, 2, 3, 4), 0.5))
    assert line.split()[0] == "potted_plant" and len(line.split()) == 16


def test_label_file_has_one_line_per_detection(tmp_path):
    path = tmp_path / "labels" / "img.txt"
    detections = [Detection("car", (1, 2, 3, 4), 0.9), Detection("truck", (5, 6, 7, 8), 0.6)]
    write_kitti_labels(str(path), detections)
    lines = path.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["car", "truck"]
    assert [line.split()[-1] for line in lines] == ["0.900", "0.600"]
    empty = tmp_path / "labels" / "none.txt"
    write_kitti_labels(str(empty), [])
    assert empty.read_text() == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["img.txt", "none.txt"]  # no temporary left behind


def test_color_map_wins_and_the_palette_fills_in():
    colors = class_colors(["car", "person", "bicycle"], {"person": "#00ff00", "bicycle": "orange"})
    assert colors["person"] == (0, 255, 0)
    assert colors["bicycle"] == (255, 165, 0)
    assert colors["car"] == tuple(int(DEFAULT_PALETTE[0][i:i + 2], 16) for i in (1, 3, 5))


def test_bad_colour_names_the_field():
    with pytest.raises(UsageError, match=r"inference\.color_map\.car: 'not-a-colour'"):
        class_colors(["car"], {"car": "not-a-colour"})


def test_colour_for_an_unknown_class_is_refused():
    with pytest.raises(UsageError, match=r"inference\.color_map: \['lorry'\]"):
        class_colors(["car"], {"lorry": "red"})


def test_boxes_and_labels_are_drawn_in_the_class_colour(tmp_path):
    image = Image.new("RGB", (200, 160), (30, 30, 30))
    colors = class_colors(["car", "person"], {"car": "#ff0000"})
    detections = [Detection("car", (40, 60, 120, 140), 0.91), Detection("person", (150, 5, 190, 50), 0.4)]
    drawn = draw_detections(image, detections, colors)
    assert drawn.size == image.size
    assert image.getpixel((40, 100)) == (30, 30, 30)  # the input is not drawn on
    assert drawn.getpixel((40, 100)) == (255, 0, 0)  # left edge of the car box
    assert drawn.getpixel((80, 139)) == (255, 0, 0) or drawn.getpixel((80, 140)) == (255, 0, 0)  # bottom edge
    assert drawn.getpixel((80, 100)) == (30, 30, 30)  # inside the box: untouched
    assert drawn.getpixel((40, 57)) == (255, 0, 0)  # label background just above the box
    assert drawn.getpixel((190, 30)) == colors["person"]  # right edge of the person box
    path = tmp_path / "out" / "drawn.png"
    save_image(drawn, str(path))
    assert Image.open(path).getpixel((40, 100)) == (255, 0, 0)


def test_label_goes_inside_a_box_at_the_top_edge():
    image = Image.new("RGB", (200, 160), (0, 0, 0))
    drawn = draw_detections(image, [Detection("car", (10, 0, 150, 100), 0.5)], {"car": (0, 0, 255)})
    # The label's background shows between the letters in the strip just inside the top edge.
    strip = [drawn.getpixel((x, y)) for x in range(12, 40) for y in range(2, 9)]
    assert strip.count((0, 0, 255)) > len(strip) / 4
    assert drawn.getpixel((30, 40)) == (0, 0, 0)  # further down, the box is untouched


@pytest.mark.parametrize("outline_width", [1, 3, 6])
def test_boxes_are_drawn_outline_width_pixels_wide(outline_width):
    image = Image.new("RGB", (200, 160), (0, 0, 0))
    drawn = draw_detections(image, [Detection("car", (40, 60, 160, 150), 0.5)], {"car": (255, 0, 0)},
                            outline_width=outline_width)
    # A row through the middle of the box: the left edge is outline_width red pixels from x=40 inwards.
    row = [drawn.getpixel((x, 120)) for x in range(30, 60)]
    red = [30 + k for k, pixel in enumerate(row) if pixel == (255, 0, 0)]
    assert red == list(range(40, 40 + outline_width))
