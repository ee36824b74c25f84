"""Train a small CNN on scikit-learn's digits with plain numpy and export it to ONNX.

Outputs (next to this file unless --out DIR is given):
  digits_cnn.onnx  Conv+BN+ReLU -> Conv+BN+ReLU -> MaxPool -> Flatten -> Gemm+ReLU -> Gemm
  calib.npz        image: float32 (200,1,8,8), calibration inputs (not in eval)
  eval.npz         image: float32 (M,1,8,8), labels: int64 (M,), held-out eval set

Re-running reproduces the files byte for byte (fixed seeds, single-threaded BLAS,
deterministic protobuf serialization, fixed zip timestamps).
"""

import os

# Pin BLAS to one thread before numpy loads: the thread count changes how matmul sums
# are split, so the float32 weights (and the .onnx bytes) would depend on the machine's
# core count. Single-threaded is still only a few seconds for this model.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
N_EVAL, N_CALIB = 397, 200  # the remaining 1200 images are the training set
EPOCHS, BATCH, LR = 20, 32, 1e-3
BN_EPS, BN_MOMENTUM = 1e-5, 0.9


# ----------------------------------------------------------------------------- data
def load_splits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # pixels are 0..16 -> [0, 1]
    y = y.astype(np.int64)
    # Stratified so every split has the same class balance; eval is carved out first
    # so it is never seen by training or calibration.
    X_rest, X_eval, y_rest, y_eval = train_test_split(X, y, test_size=N_EVAL, stratify=y, random_state=SEED)
    X_train, X_calib, y_train, _ = train_test_split(
        X_rest, y_rest, test_size=N_CALIB, stratify=y_rest, random_state=SEED
    )
    # Guard against duplicate images leaking between splits.
    seen = {r.tobytes() for r in np.concatenate([X_train, X_calib])}
    assert not any(r.tobytes() in seen for r in X_eval), "eval overlaps train/calib"
    return X_train, y_train, X_calib, X_eval, y_eval


# ----------------------------------------------------------------------------- layers
def im2col(x):
    """(N,C,H,W) -> (N*H*W, C*9) patches for a 3x3, stride 1, pad 1 convolution."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=2)
    # cols: (N, C, 9, H, W) -> rows are output pixels, columns are (c, ki, kj) like ONNX weights
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * 9)


def col2im(dcols, shape):
    """Adjoint of im2col: scatter-add patch gradients back to the (N,C,H,W) input."""
    n, c, h, w = shape
    d = dcols.reshape(n, h, w, c, 3, 3).transpose(0, 3, 4, 5, 1, 2)  # (N,C,3,3,H,W)
    dxp = np.zeros((n, c, h + 2, w + 2), dtype=dcols.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i : i + h, j : j + w] += d[:, :, i, j]
    return dxp[:, :, 1:-1, 1:-1]


def conv_fwd(x, W):
    # No conv bias: the BatchNormalization right after it would cancel any bias anyway.
    n, _, h, w = x.shape
    cols = im2col(x)
    out = cols @ W.reshape(W.shape[0], -1).T  # (N*H*W, Cout)
    return out.reshape(n, h, w, -1).transpose(0, 3, 1, 2), (cols, x.shape)


def conv_bwd(dout, W, cache):
    cols, xshape = cache
    d = dout.transpose(0, 2, 3, 1).reshape(-1, W.shape[0])  # (N*H*W, Cout)
    dW = (d.T @ cols).reshape(W.shape)
    dx = col2im(d @ W.reshape(W.shape[0], -1), xshape)
    return dx, dW


def bn_fwd(x, p, name, train):
    g, b = p[name + "_scale"], p[name + "_bias"]
    if not train:  # inference mode == what the ONNX BatchNormalization node computes
        mean, var = p[name + "_mean"], p[name + "_var"]
        return (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + BN_EPS) * g[:, None, None] + b[
            :, None, None
        ], None
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    # Exponential running statistics are what gets exported for inference.
    p[name + "_mean"] = BN_MOMENTUM * p[name + "_mean"] + (1 - BN_MOMENTUM) * mean
    p[name + "_var"] = BN_MOMENTUM * p[name + "_var"] + (1 - BN_MOMENTUM) * var
    inv = 1.0 / np.sqrt(var + BN_EPS)
    xhat = (x - mean[:, None, None]) * inv[:, None, None]
    return xhat * g[:, None, None] + b[:, None, None], (xhat, inv)


def bn_bwd(dout, g, cache):
    xhat, inv = cache
    m = dout.shape[0] * dout.shape[2] * dout.shape[3]
    dg, db = (dout * xhat).sum(axis=(0, 2, 3)), dout.sum(axis=(0, 2, 3))
    # Standard batch-norm gradient, written in terms of the normalized input.
    dx = (g * inv)[:, None, None] / m * (m * dout - db[:, None, None] - xhat * dg[:, None, None])
    return dx, dg, db


def maxpool_fwd(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    idx = win.argmax(axis=-1)  # route the gradient to one winner per window (ties: first)
    return np.take_along_axis(win, idx[..., None], -1)[..., 0], (idx, x.shape)


def maxpool_bwd(dout, cache):
    idx, (n, c, h, w) = cache
    dwin = np.zeros(dout.shape + (4,), dtype=dout.dtype)
    np.put_along_axis(dwin, idx[..., None], dout[..., None], -1)
    return dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


# ----------------------------------------------------------------------------- model
def init_params(rng):
    def he(shape, fan_in):  # He init keeps ReLU activations at a sane scale
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    p = {
        "conv1_W": he((16, 1, 3, 3), 9),
        "conv2_W": he((32, 16, 3, 3), 144),
        "fc1_W": he((64, 512), 512),
        "fc1_b": np.zeros(64, np.float32),
        "fc2_W": he((10, 64), 64),
        "fc2_b": np.zeros(10, np.float32),
    }
    for name, c in (("bn1", 16), ("bn2", 32)):
        p[name + "_scale"], p[name + "_bias"] = np.ones(c, np.float32), np.zeros(c, np.float32)
        p[name + "_mean"], p[name + "_var"] = np.zeros(c, np.float32), np.ones(c, np.float32)
    return p


TRAINABLE = ["conv1_W", "bn1_scale", "bn1_bias", "conv2_W", "bn2_scale", "bn2_bias", "fc1_W", "fc1_b", "fc2_W", "fc2_b"]


def forward(p, x, train=False):
    """Returns logits (and the caches backward() needs). Same graph as the ONNX export."""
    c = {}
    h, c["conv1"] = conv_fwd(x, p["conv1_W"])
    h, c["bn1"] = bn_fwd(h, p, "bn1", train)
    c["relu1"] = h > 0
    h = h * c["relu1"]
    h, c["conv2"] = conv_fwd(h, p["conv2_W"])
    h, c["bn2"] = bn_fwd(h, p, "bn2", train)
    c["relu2"] = h > 0
    h = h * c["relu2"]
    h, c["pool"] = maxpool_fwd(h)
    c["flat_shape"] = h.shape
    h = h.reshape(h.shape[0], -1)  # same C,H,W order as ONNX Flatten(axis=1)
    c["fc1_in"] = h
    h = h @ p["fc1_W"].T + p["fc1_b"]  # Gemm with transB=1
    c["relu3"] = h > 0
    h = h * c["relu3"]
    c["fc2_in"] = h
    return h @ p["fc2_W"].T + p["fc2_b"], c


def backward(p, c, dlogits):
    g = {}
    g["fc2_W"], g["fc2_b"] = dlogits.T @ c["fc2_in"], dlogits.sum(0)
    d = (dlogits @ p["fc2_W"]) * c["relu3"]
    g["fc1_W"], g["fc1_b"] = d.T @ c["fc1_in"], d.sum(0)
    d = (d @ p["fc1_W"]).reshape(c["flat_shape"])
    d = maxpool_bwd(d, c["pool"]) * c["relu2"]
    d, g["bn2_scale"], g["bn2_bias"] = bn_bwd(d, p["bn2_scale"], c["bn2"])
    d, g["conv2_W"] = conv_bwd(d, p["conv2_W"], c["conv2"])
    d = d * c["relu1"]
    d, g["bn1_scale"], g["bn1_bias"] = bn_bwd(d, p["bn1_scale"], c["bn1"])
    _, g["conv1_W"] = conv_bwd(d, p["conv1_W"], c["conv1"])
    return g


def softmax_xent(logits, y):
    z = logits - logits.max(1, keepdims=True)  # shift for numerical stability
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss = -np.log(prob[np.arange(len(y)), y] + 1e-12).mean()
    prob[np.arange(len(y)), y] -= 1
    return loss, prob / len(y)  # gradient of the mean loss w.r.t. logits


def predict(p, x):
    return forward(p, x, train=False)[0]


def train(X, y):
    rng = np.random.default_rng(SEED)
    p = init_params(rng)
    m = {k: np.zeros_like(p[k]) for k in TRAINABLE}
    v = {k: np.zeros_like(p[k]) for k in TRAINABLE}
    step = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(len(X))
        losses = []
        for i in range(0, len(X), BATCH):
            bi = order[i : i + BATCH]
            logits, cache = forward(p, X[bi], train=True)
            loss, dlogits = softmax_xent(logits, y[bi])
            grads = backward(p, cache, dlogits)
            step += 1
            for k in TRAINABLE:  # Adam: robust default, no per-layer LR tuning needed
                m[k] = 0.9 * m[k] + 0.1 * grads[k]
                v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
                mhat, vhat = m[k] / (1 - 0.9**step), v[k] / (1 - 0.999**step)
                p[k] = (p[k] - LR * mhat / (np.sqrt(vhat) + 1e-8)).astype(np.float32)
            losses.append(loss)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:2d}  loss {np.mean(losses):.4f}")
    return {k: np.asarray(a, dtype=np.float32) for k, a in p.items()}


# ----------------------------------------------------------------------------- export
def export_onnx(p, path):
    init = [numpy_helper.from_array(p[k], k) for k in sorted(p)]
    nodes = [
        helper.make_node("Conv", ["image", "conv1_W"], ["conv1"], "conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        # BN kept as its own inference-mode node so a later fuse pass can fold it into the Conv.
        helper.make_node(
            "BatchNormalization",
            ["conv1", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"],
            ["bn1"],
            "bn1",
            epsilon=BN_EPS,
        ),
        helper.make_node("Relu", ["bn1"], ["relu1"], "relu1"),
        helper.make_node("Conv", ["relu1", "conv2_W"], ["conv2"], "conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["conv2", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"],
            ["bn2"],
            "bn2",
            epsilon=BN_EPS,
        ),
        helper.make_node("Relu", ["bn2"], ["relu2"], "relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1_W", "fc1_b"], ["fc1"], "fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu3"], "relu3"),
        helper.make_node("Gemm", ["relu3", "fc2_W", "fc2_b"], ["logits"], "fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        init,
    )
    model = helper.make_model(
        graph,
        producer_name="lepton-examples",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", 13)],
        doc_string="Small CNN for scikit-learn's digits (8x8 grayscale, 10 classes). "
        "Input 'image' is float32 [N,1,8,8] with pixels scaled from 0..16 to [0,1]; "
        "output 'logits' is [N,10]. Trained with numpy by examples/digits/train.py.",
    )
    model.ir_version = 8  # IR 8 pairs with opset 13 and loads in any onnxruntime >= 1.10
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


def save_npz(path, **arrays):
    """Like np.savez, but with fixed zip timestamps so the bytes are reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), npy.getvalue())
    path.write_bytes(buf.getvalue())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    X_train, y_train, X_calib, X_eval, y_eval = load_splits()
    p = train(X_train, y_train)

    model_path, calib_path, eval_path = out / "digits_cnn.onnx", out / "calib.npz", out / "eval.npz"
    export_onnx(p, model_path)
    save_npz(calib_path, image=X_calib)
    save_npz(eval_path, image=X_eval, labels=y_eval)

    # Cross-check the exported graph against the numpy model it came from.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"image": X_eval})[0]
    np_logits = predict(p, X_eval)
    diff = float(np.abs(ort_logits - np_logits).max())
    assert diff < 1e-4, f"onnxruntime and numpy disagree: max abs diff {diff}"
    train_acc = float((predict(p, X_train).argmax(1) == y_train).mean())
    eval_acc = float((ort_logits.argmax(1) == y_eval).mean())
    assert eval_acc >= 0.95, f"eval accuracy too low: {eval_acc:.4f}"

    print(f"train top-1 {train_acc:.4f} ({len(X_train)} images)")
    print(f"eval  top-1 {eval_acc:.4f} ({len(X_eval)} held-out images, onnxruntime)")
    print(f"onnxruntime vs numpy max abs diff {diff:.2e}")
    for path in (model_path, calib_path, eval_path):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
