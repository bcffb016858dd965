"""Parameter files: the C++ safetensors reader and writer against the Python safetensors package, and
nn::MultiHeadAttention's files against torch.nn.MultiheadAttention, both ways.

Tolerances: values written and read are compared exactly (bit for bit). Module outputs: float64,
1e-12 absolute on O(1) values (the same formulas evaluated in a different order)."""
import pytest
import torch
from safetensors.torch import load_file as st_load, save_file as st_save

import autodiff_attention as aa

E, H, B, L = 8, 2, 3, 5


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "layer.0.weight": torch.randn(4, 3, generator=g),
        "layer.0.bias": torch.randn(4, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "rank4": torch.randn(2, 1, 3, 2, generator=g),
        "empty": torch.zeros(0, 3),
    }


def test_cpp_writes_what_safetensors_reads(tmp_path):
    path = tmp_path / "cpp.safetensors"
    aa.save_file(tensors(), path, metadata={"format": "pt", "note": 'quote " é'})
    back = st_load(str(path))
    assert set(back) == set(tensors())
    for name, t in tensors().items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": 'quote " é'}


def test_cpp_reads_what_safetensors_writes(tmp_path):
    path = tmp_path / "py.safetensors"
    st_save(tensors(), str(path), metadata={"format": "pt"})
    back = aa.load_file(path)
    assert set(back) == set(tensors())
    for name, t in tensors().items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    assert aa.load_metadata(path) == {"format": "pt"}


def test_truncated_and_foreign_files_raise_the_cpp_message(tmp_path):
    path = tmp_path / "t.safetensors"
    st_save({"w": torch.randn(8, 8)}, str(path))
    data = path.read_bytes()
    for cut in (4, 30, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(aa.Error, match=r"load_safetensors: .*t\.safetensors: the file is truncated"):
            aa.load_file(path)
    st_save({"h": torch.zeros(2, dtype=torch.float16)}, str(path))
    with pytest.raises(aa.Error, match=r"tensor 'h' has dtype F16; only F32 and F64 are supported"):
        aa.load_file(path)
    with pytest.raises(aa.Error, match=r"save_safetensors: .*tensor 'x' has dtype \(DLPack"):
        aa.save_file({"x": torch.zeros(2, dtype=torch.int32)}, path)


def torch_mha(dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=dtype).eval()


def x_input(dtype=torch.float64):
    return torch.randn(B, L, E, generator=torch.Generator().manual_seed(7), dtype=dtype)


def test_our_multihead_attention_file_loads_into_torch(tmp_path):
    path = tmp_path / "mha.safetensors"
    x = x_input()
    ours = aa._C.mha_forward(E, H, 5, None, str(path), x)
    state = st_load(str(path))
    assert set(state) == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    mha = torch_mha()
    mha.load_state_dict(state, strict=True)
    with torch.no_grad():
        theirs, _ = mha(x, x, x, need_weights=False)
    assert (ours - theirs).abs().max().item() < 1e-12


def test_torch_multihead_attention_file_loads_into_ours(tmp_path):
    path = tmp_path / "torch_mha.safetensors"
    mha = torch_mha(seed=3)
    with torch.no_grad():  # non-zero biases, so that a bias mixed up with another shows
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    st_save({k: v.contiguous() for k, v in mha.state_dict().items()}, str(path))
    x = x_input()
    ours = aa._C.mha_forward(E, H, 99, str(path), None, x)
    with torch.no_grad():
        theirs, _ = mha(x, x, x, need_weights=False)
    assert (ours - theirs).abs().max().item() < 1e-12


def test_loading_a_module_checks_names_shapes_and_dtypes(tmp_path):
    path = tmp_path / "bad.safetensors"
    x = x_input()
    st_save({k: v.contiguous() for k, v in torch_mha().state_dict().items()}, str(path))
    with pytest.raises(aa.Error, match=r"load_parameters: .*: tensor 'in_proj_weight' has shape \(24,8\), expected \(48,16\)"):
        aa._C.mha_forward(2 * E, H, 1, str(path), None, torch.randn(B, L, 2 * E, dtype=torch.float64))
    with pytest.raises(aa.Error, match=r"load_parameters: .*: tensor 'in_proj_weight' has dtype F64, expected F32"):
        aa._C.mha_forward(E, H, 1, str(path), None, x.float())
    state = {k: v.contiguous() for k, v in torch_mha().state_dict().items()}
    state["out_proj.weights"] = state.pop("out_proj.weight")
    st_save(state, str(path))
    with pytest.raises(aa.Error, match=r"load_parameters: .*: no tensor 'out_proj.weight' \(expected shape \(8,8\), dtype F64\)"):
        aa._C.mha_forward(E, H, 1, str(path), None, x)


def adam_problem(seed=11):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    data = [(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64))
            for _ in range(5)]
    return w, b, data


def torch_adam_steps(layer, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(x), y).backward()
        opt.step()


def torch_layer(w, b):
    layer = torch.nn.Linear(3, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


def test_our_adam_state_is_torchs_state_dict_flattened(tmp_path):
    path = tmp_path / "adam.safetensors"
    w, b, data = adam_problem()
    ours_w, ours_b = aa._C.linear_adam(w, b, [x for x, _ in data[:3]], [y for _, y in data[:3]], 0.01, None, str(path))
    layer = torch_layer(w, b)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    torch_adam_steps(layer, opt, data[:3])
    assert (ours_w - layer.weight).abs().max().item() < 1e-12
    theirs = opt.state_dict()["state"]
    file = st_load(str(path))
    assert set(file) == {f"state.{i}.{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")}
    for i in (0, 1):
        assert file[f"state.{i}.step"].item() == theirs[i]["step"].item() == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert (file[f"state.{i}.{key}"] - theirs[i][key]).abs().max().item() < 1e-12, (i, key)


def test_torchs_adam_state_resumes_in_ours(tmp_path):
    path = tmp_path / "torch_adam.safetensors"
    w, b, data = adam_problem()
    layer = torch_layer(w, b)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    torch_adam_steps(layer, opt, data[:3])
    state = opt.state_dict()["state"]
    st_save({f"state.{i}.{k}": v.to(torch.float64).reshape(v.shape).contiguous() for i, s in state.items() for k, v in s.items()},
            str(path))
    resumed_w, resumed_b = aa._C.linear_adam(layer.weight.detach().clone(), layer.bias.detach().clone(),
                                             [x for x, _ in data[3:]], [y for _, y in data[3:]], 0.01, str(path), None)
    torch_adam_steps(layer, opt, data[3:])
    assert (resumed_w - layer.weight).abs().max().item() < 1e-12
    assert (resumed_b - layer.bias).abs().max().item() < 1e-12
