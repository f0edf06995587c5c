"""Feature statistics and the Fréchet distance between them (FID, FVD), in float64 on the host.

  stats = FeatureStats(dim)            # streaming: add batches of features as they come
  stats.add(features)                  # [N, dim]
  mu, sigma = stats.mean_and_cov()
  frechet_distance(mu, sigma, mu_real, sigma_real)

d² = |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½). The matrix square root is `scipy.linalg.sqrtm`, the
method of pytorch-fid and StyleGAN-V's FVD: where the product is near-singular (fewer samples than
dimensions) its square root is not finite, and like pytorch-fid we add ε·I to both covariances; a
numerically complex result with negligible imaginary part is taken as real. (cd-fvd and tfgan take
the trace of the square root from the singular values instead: the two agree to ~1e-6 relative on
well-conditioned statistics, and can differ more on rank-deficient ones.)

The covariance is the unbiased sample covariance (`np.cov`, ddof 1), as in pytorch-fid and
StyleGAN-V; sums are accumulated in float64 so that many small batches give the statistics of one
big one.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import scipy.linalg

SQRTM_EPS = 1e-6  # pytorch-fid's offset for a singular covariance product


@dataclasses.dataclass
class FeatureStats:
  """Running sums for the mean and covariance of features [N, dim]."""

  dim: int
  count: int = 0
  total: np.ndarray = None
  outer: np.ndarray = None

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros(self.dim, np.float64)
    if self.outer is None:
      self.outer = np.zeros((self.dim, self.dim), np.float64)

  def add(self, features) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"Expected features [N, {self.dim}], got shape {x.shape}.")
    self.count += x.shape[0]
    self.total += x.sum(0)
    self.outer += x.T @ x

  def mean_and_cov(self) -> tuple[np.ndarray, np.ndarray]:
    if self.count < 2:
      raise ValueError(
          f"Feature statistics need at least 2 samples for a covariance; got {self.count}."
      )
    mean = self.total / self.count
    cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return mean, cov

  def save(self, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, dim=self.dim, count=self.count, total=self.total, outer=self.outer)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "FeatureStats":
    with np.load(path) as f:
      return cls(int(f["dim"]), int(f["count"]), f["total"], f["outer"])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SQRTM_EPS) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64; see the module
  docstring for the square-root method)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
        "Means and covariances must match: got means "
        f"{mu1.shape} / {mu2.shape} and covariances {sigma1.shape} / {sigma2.shape}."
    )
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          f"The covariance product's square root has an imaginary component of "
          f"{np.max(np.abs(covmean.imag)):.3g}: the statistics are degenerate (too few samples?)."
      )
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_of(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
  return frechet_distance(*stats_a.mean_and_cov(), *stats_b.mean_and_cov())
