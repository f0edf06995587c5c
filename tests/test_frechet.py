"""The Fréchet distance (vldm.eval.frechet) vs pytorch-fid's reference computation with scipy, the
streaming statistics vs numpy's, and the tfgan / cd-fvd trace-of-square-root method."""

import numpy as np
import pytest
from scipy import linalg

from vldm.eval import frechet


def pytorch_fid_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid 0.3.0, src/pytorch_fid/fid_score.py `calculate_frechet_distance` (Apache-2.0,
  Maximilian Seitzer), verbatim but for the prints."""
  mu1 = np.atleast_1d(mu1)
  mu2 = np.atleast_1d(mu2)
  sigma1 = np.atleast_2d(sigma1)
  sigma2 = np.atleast_2d(sigma2)
  diff = mu1 - mu2
  covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  tr_covmean = np.trace(covmean)
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def trace_sqrt_product_svd(sigma1, sigma2):
  """tfgan's `trace_sqrt_product` (used by cd-fvd): tr((Σ₁Σ₂)^½) = Σ sqrt(eig(√Σ₁ Σ₂ √Σ₁))."""
  sqrt_sigma1 = linalg.sqrtm(sigma1).real
  product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  return np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()


def _random_stats(rng, dim, n, shift=0.0):
  x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + shift
  return x, x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim,n", [(8, 200), (64, 500), (64, 40)])  # the last: rank-deficient
def test_matches_pytorch_fid(dim, n):
  rng = np.random.default_rng(dim + n)
  _, mu1, s1 = _random_stats(rng, dim, n)
  _, mu2, s2 = _random_stats(rng, dim, n, shift=0.2)
  ours = frechet.frechet_distance(mu1, s1, mu2, s2)
  reference = pytorch_fid_frechet_distance(mu1, s1, mu2, s2)
  assert abs(ours - reference) <= 1e-6 * abs(reference)


def test_agrees_with_the_svd_trace_method_on_well_conditioned_statistics():
  rng = np.random.default_rng(0)
  _, mu1, s1 = _random_stats(rng, 16, 2000)
  _, mu2, s2 = _random_stats(rng, 16, 2000, shift=0.1)
  svd = mu1 - mu2
  svd = svd @ svd + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product_svd(s1, s2)
  ours = frechet.frechet_distance(mu1, s1, mu2, s2)
  assert ours == pytest.approx(svd, rel=1e-6)


def test_identical_statistics_are_at_distance_zero():
  rng = np.random.default_rng(1)
  _, mu, sigma = _random_stats(rng, 32, 400)
  assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_streaming_stats_equal_numpy_and_survive_save_and_load(tmp_path):
  rng = np.random.default_rng(2)
  x, mu, sigma = _random_stats(rng, 12, 300)
  stats = frechet.FeatureStats(12)
  for part in np.array_split(x.astype(np.float32), 7):  # float32 features, as networks give
    stats.add(part)
  got_mu, got_sigma = stats.mean_and_cov()
  np.testing.assert_allclose(got_mu, mu, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_sigma, sigma, rtol=1e-5, atol=1e-6)
  stats.save(str(tmp_path / "stats.npz"))
  loaded = frechet.FeatureStats.load(str(tmp_path / "stats.npz"))
  assert loaded.count == 300
  np.testing.assert_array_equal(loaded.mean_and_cov()[1], got_sigma)


def test_bad_input():
  with pytest.raises(ValueError, match=r"features \[N, 4\]"):
    frechet.FeatureStats(4).add(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="at least 2 samples"):
    frechet.FeatureStats(4).mean_and_cov()
  with pytest.raises(ValueError, match="must match"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
