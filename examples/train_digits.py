"""Train a small CNN on scikit-learn's bundled 8x8 digits with fastconv layers.

The network is built only from fastconv layers plus a few lines of NumPy:

    Conv2D(1, 16, 3, padding=1) -> ReLU -> MaxPool2D(2)      # 16 x 4 x 4
    Conv2D(16, 32, 3, padding=1) -> ReLU -> AvgPool2D(2)     # 32 x 2 x 2
    flatten -> affine (128 -> 10) -> softmax cross-entropy

trained with Adam (cosine-decayed step size) on mini-batches. The data set (1797 images, 8x8, values
0..16) ships with scikit-learn, so nothing is downloaded. Seeds are fixed:
two runs print the same numbers.

Usage::

    python examples/train_digits.py                 # full run, prints per-epoch lines
    python examples/train_digits.py --epochs 1 --subset 300
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import fastconv
from fastconv import AvgPool2D, Conv2D, MaxPool2D, ReLU


def load_data(seed: int = 0, test_fraction: float = 0.2):
    """Digits as float32 (N, 1, 8, 8), stratified train/test split, standardised.

    The pixels (0..16) are shifted and scaled by the training set's mean and
    standard deviation: zero-centred inputs train several times faster than
    raw [0, 1] ones at the start.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std, y_train, y_test


class Affine:
    """``y = x @ W + b`` with PyTorch's default uniform init."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator) -> None:
        bound = 1.0 / np.sqrt(n_in)
        self.W = rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32)
        self.b = rng.uniform(-bound, bound, n_out).astype(np.float32)
        self.dW = self.db = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        return x @ self.W + self.b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.dW = self._x.T @ dout
        self.db = dout.sum(axis=0)
        return dout @ self.W.T


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = labels.shape[0]
    loss = -float(log_probs[np.arange(n), labels].mean())
    grad = np.exp(log_probs)
    grad[np.arange(n), labels] -= 1
    return loss, grad / n


class Adam:
    """Adam over a list of (owner, parameter name, gradient name)."""

    def __init__(self, slots, lr: float = 3e-3, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.slots = slots
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.m = [np.zeros_like(getattr(o, p)) for o, p, _ in slots]
        self.v = [np.zeros_like(getattr(o, p)) for o, p, _ in slots]
        self.t = 0

    def step(self) -> None:
        self.t += 1
        scale = self.lr * np.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        for (owner, param, grad), m, v in zip(self.slots, self.m, self.v):
            g = getattr(owner, grad)
            m += (1 - self.b1) * (g - m)
            v += (1 - self.b2) * (g * g - v)
            getattr(owner, param)[...] -= (scale * m / (np.sqrt(v) + self.eps)).astype(m.dtype)


class Net:
    """The CNN of the module docstring; ``forward`` returns logits."""

    def __init__(self, seed: int = 0, n_threads: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.conv1 = Conv2D(1, 16, 3, padding=1, rng=rng, n_threads=n_threads)
        self.conv2 = Conv2D(16, 32, 3, padding=1, rng=rng, n_threads=n_threads)
        self.features = [self.conv1, ReLU(n_threads=n_threads), MaxPool2D(2, n_threads=n_threads),
                         self.conv2, ReLU(n_threads=n_threads), AvgPool2D(2, n_threads=n_threads)]
        self.fc = Affine(32 * 2 * 2, 10, rng)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.features:
            x = layer(x)
        self._shape = x.shape
        return self.fc.forward(x.reshape(x.shape[0], -1))

    def backward(self, dlogits: np.ndarray) -> None:
        d = self.fc.backward(dlogits).reshape(self._shape)
        for layer in reversed(self.features):
            d = layer.backward(d)

    def parameters(self):
        return [(layer, p, "d" + p) for layer in (self.conv1, self.conv2, self.fc)
                for p in ("W", "b")]

    def predict(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return np.concatenate([self.forward(x[i:i + batch_size]).argmax(axis=1)
                               for i in range(0, len(x), batch_size)])


def train(epochs: int = 15, subset: int | None = None, batch_size: int = 32, lr: float = 1e-2,
          seed: int = 0, n_threads: int | None = None, log=print) -> dict:
    """Train and evaluate; returns the history (per-batch losses, per-epoch metrics).

    Parameters
    ----------
    epochs : int
        Passes over the training set.
    subset : int, optional
        Use only the first ``subset`` training images (quick runs and tests).
    batch_size, lr, seed, n_threads
        Mini-batch size, initial Adam step size, the seed of initialisation and
        shuffling, and fastconv's thread count.
    log : callable
        Receives one line per epoch (``print`` by default).
    """
    x_train, x_test, y_train, y_test = load_data(seed)
    if subset is not None:
        x_train, y_train = x_train[:subset], y_train[:subset]
    net = Net(seed, n_threads)
    optimizer = Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed + 1)
    history = {"batch_loss": [], "epoch_loss": [], "train_accuracy": [], "test_accuracy": []}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        # cosine decay: large steps early, small ones to settle at the end
        optimizer.lr = lr * 0.5 * (1 + np.cos(np.pi * (epoch - 1) / epochs))
        order = rng.permutation(len(x_train))
        losses, correct = [], 0
        for i in range(0, len(order), batch_size):
            batch = order[i:i + batch_size]
            logits = net.forward(x_train[batch])
            loss, dlogits = softmax_cross_entropy(logits, y_train[batch])
            net.backward(dlogits)
            optimizer.step()
            losses.append(loss)
            correct += int((logits.argmax(axis=1) == y_train[batch]).sum())
        test_accuracy = float((net.predict(x_test) == y_test).mean())
        history["batch_loss"] += losses
        history["epoch_loss"].append(float(np.mean(losses)))
        history["train_accuracy"].append(correct / len(order))
        history["test_accuracy"].append(test_accuracy)
        log(f"epoch {epoch:2d}/{epochs}  loss {history['epoch_loss'][-1]:.4f}  "
            f"train accuracy {correct / len(order):.4f}  test accuracy {test_accuracy:.4f}  "
            f"({time.perf_counter() - start:.1f} s)")
    history["seconds"] = time.perf_counter() - start
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--subset", type=int, default=None,
                        help="train on the first N training images only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="initial Adam step size (cosine decay over the epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="fastconv's n_threads")
    args = parser.parse_args(argv)
    print(f"fastconv {fastconv.__version__}: training on sklearn digits "
          f"({'all' if args.subset is None else args.subset} training images, "
          f"{args.epochs} epochs)")
    history = train(args.epochs, args.subset, args.batch_size, args.lr, args.seed, args.threads)
    print(f"wall time: {history['seconds']:.1f} s")
    print(f"test accuracy: {history['test_accuracy'][-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
