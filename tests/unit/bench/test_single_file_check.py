"""The reload check of make smoke-sdxl: it counts equal tensors and names missing and unexpected keys."""

from __future__ import annotations

import torch

from bench.single_file_check import compare


def test_compare_counts_equal_tensors_and_names_what_differs():
    source = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    same = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    same.load_state_dict(source.state_dict())
    assert compare(same, source) == {"tensors": 4, "equal": 4, "missing": [], "unexpected": []}

    with torch.no_grad():
        same[1].bias[0] += 1e-3
    assert compare(same, source)["equal"] == 3

    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False), torch.nn.LayerNorm(2))
    result = compare(other, source)
    assert result["missing"] == ["1.bias"] and result["unexpected"] == ["2.bias", "2.weight"]
