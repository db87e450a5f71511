"""Classical restorations that the learned models are compared with.

Images: (N, C, H, W) float in [0, 1], filtered per image and channel.

- :func:`median_filter`: the textbook remedy for impulse (salt-and-pepper) noise;
- :func:`gaussian_blur`: linear low-pass smoothing against Gaussian noise.

Speech: waveforms (N, T), processed in the STFT domain with the noisy phase kept.

- :func:`spectral_subtraction`: magnitude spectral subtraction (Boll, 1979);
- :func:`wiener_filter`: the Wiener gain xi / (1 + xi) with the a-priori SNR xi
  from the decision-directed estimate (Ephraim & Malah, 1984), or from the
  maximum-likelihood estimate when ``dd_alpha=0``.

Both speech methods need the noise spectrum. It comes from a noise-only signal
(``noise``) when one is given, else from frames of each noisy clip itself:
the first ``noise_frames`` (``noise_from="leading"``, Boll's assumption that an
utterance starts with silence) or the ``noise_frames`` quietest frames
(``noise_from="quietest"``, suited to clips that start with speech and are
padded at the end, such as trimmed spoken digits).

scipy and librosa are imported inside the functions.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

NoiseFrom = Literal["leading", "quietest"]

_EPS = 1e-12


# ---------------------------------------------------------------------- images
def median_filter(x: np.ndarray, size: int = 3) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H, W) float32: ``size`` x ``size`` median of each image channel.

    ``scipy.ndimage.median_filter`` with ``mode="reflect"``; the window never
    spans two images or two channels.
    """
    from scipy import ndimage

    x = _images(x)
    if size < 1:
        raise ValueError(f"median filter size must be at least 1, got {size}")
    return ndimage.median_filter(x, size=(1, 1, size, size), mode="reflect").astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H, W) float32: Gaussian smoothing of std ``sigma`` pixels per image channel.

    ``scipy.ndimage.gaussian_filter`` with ``mode="reflect"`` (a constant image is unchanged).
    """
    from scipy import ndimage

    x = _images(x)
    if sigma < 0:
        raise ValueError(f"gaussian blur sigma must be >= 0, got {sigma}")
    return ndimage.gaussian_filter(x, sigma=(0.0, 0.0, sigma, sigma), mode="reflect").astype(np.float32)


def _images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {x.shape}")
    return x


# ---------------------------------------------------------------------- speech
def spectral_subtraction(
    noisy: np.ndarray,
    noise_frames: int = 6,
    n_fft: int = 512,
    hop_length: int = 128,
    *,
    noise: np.ndarray | None = None,
    noise_from: NoiseFrom = "leading",
    over_subtraction: float = 1.0,
    floor: float = 0.02,
) -> np.ndarray:
    """Boll's (1979) magnitude spectral subtraction: (N, T) noisy waveforms -> (N, T) float32.

    Per STFT bin: ``|S| = max(|Y| - over_subtraction * mean|N|, floor * |Y|)``
    (half-wave rectification with a spectral floor against musical noise),
    resynthesised with the noisy phase by ``librosa.istft`` at the input length.

    Args:
        noisy: waveforms (N, T) (or one (T,), returned as (T,)).
        noise_frames: frames of each noisy clip that estimate its noise (see the module docstring).
        n_fft: FFT size (Hann window of the same length).
        hop_length: samples between frames.
        noise: optional noise-only waveform (T',) shared by every row, or (N, T') per row;
            replaces the estimate from ``noise_frames``.
        noise_from: ``"leading"`` (the first frames) or ``"quietest"`` (the lowest-energy frames).
        over_subtraction: alpha, the multiple of the noise magnitude removed.
        floor: beta, the spectral floor as a share of the noisy magnitude.
    """
    spec, squeeze, length = _stft(noisy, n_fft, hop_length)
    magnitude = np.abs(spec)
    noise_mag = _noise_spectrum(magnitude, noise, noise_frames, noise_from, n_fft, hop_length, power=1)
    clean_mag = np.maximum(magnitude - over_subtraction * noise_mag, floor * magnitude)
    gain = clean_mag / np.maximum(magnitude, _EPS)
    return _istft(spec * gain, hop_length, n_fft, length, squeeze)


def wiener_filter(
    noisy: np.ndarray,
    noise_frames: int = 6,
    n_fft: int = 512,
    hop_length: int = 128,
    *,
    noise: np.ndarray | None = None,
    noise_from: NoiseFrom = "leading",
    dd_alpha: float = 0.98,
    xi_min_db: float = -25.0,
) -> np.ndarray:
    """STFT-domain Wiener filter: (N, T) noisy waveforms -> (N, T) float32.

    Gain ``G = xi / (1 + xi)`` = S / (S + N) with xi the a-priori SNR of each
    bin. With the decision-directed estimate (Ephraim & Malah, 1984) xi of frame
    t is ``dd_alpha * |G_{t-1} Y_{t-1}|^2 / N + (1 - dd_alpha) * max(gamma_t - 1, 0)``
    where ``gamma = |Y|^2 / N`` is the a-posteriori SNR; ``dd_alpha=0`` gives
    the plain estimate S = max(|Y|^2 - N, 0). xi is floored at ``xi_min_db``.
    The noise power spectrum N is estimated as for
    :func:`spectral_subtraction` (same ``noise``, ``noise_frames``, ``noise_from``).
    """
    if not 0.0 <= dd_alpha < 1.0:
        raise ValueError(f"dd_alpha must be in [0, 1), got {dd_alpha}")
    spec, squeeze, length = _stft(noisy, n_fft, hop_length)
    power = np.abs(spec) ** 2
    noise_power = np.maximum(
        _noise_spectrum(power, noise, noise_frames, noise_from, n_fft, hop_length, power=2), _EPS
    )  # (N, F, 1)
    gamma = power / noise_power
    xi_min = 10.0 ** (xi_min_db / 10.0)
    ml = np.maximum(gamma - 1.0, 0.0)
    if dd_alpha == 0.0:
        xi = np.maximum(ml, xi_min)
        gain = xi / (1.0 + xi)
    else:
        gain = np.empty_like(gamma)
        previous = np.zeros(gamma.shape[:2])  # |G_{t-1} Y_{t-1}|^2 / N; 0 before the first frame
        for t in range(gamma.shape[2]):
            # The first frame has no previous estimate: it takes the maximum-likelihood one.
            xi = ml[:, :, 0] if t == 0 else dd_alpha * previous + (1.0 - dd_alpha) * ml[:, :, t]
            xi = np.maximum(xi, xi_min)
            gain[:, :, t] = xi / (1.0 + xi)
            previous = gain[:, :, t] ** 2 * gamma[:, :, t]
    return _istft(spec * gain, hop_length, n_fft, length, squeeze)


def _stft(noisy: np.ndarray, n_fft: int, hop_length: int) -> tuple[np.ndarray, bool, int]:
    """(N, T) or (T,) -> complex STFT (N, F, frames), whether the input was 1-D, and T."""
    import librosa

    audio = np.asarray(noisy, dtype=np.float32)
    squeeze = audio.ndim == 1
    if squeeze:
        audio = audio[None]
    if audio.ndim != 2:
        raise ValueError(f"waveforms must be (N, T) or (T,), got shape {np.shape(noisy)}")
    if n_fft < 2 or not 0 < hop_length <= n_fft:
        raise ValueError(f"need n_fft >= 2 and 0 < hop_length <= n_fft, got n_fft={n_fft} hop_length={hop_length}")
    spec = librosa.stft(audio, n_fft=n_fft, hop_length=hop_length, window="hann", center=True)
    return spec.astype(np.complex128), squeeze, audio.shape[1]


def _istft(spec: np.ndarray, hop_length: int, n_fft: int, length: int, squeeze: bool) -> np.ndarray:
    import librosa

    audio = librosa.istft(spec, hop_length=hop_length, n_fft=n_fft, window="hann", center=True, length=length)
    audio = audio.astype(np.float32)
    return audio[0] if squeeze else audio


def _noise_spectrum(
    values: np.ndarray,
    noise: np.ndarray | None,
    noise_frames: int,
    noise_from: NoiseFrom,
    n_fft: int,
    hop_length: int,
    power: int,
) -> np.ndarray:
    """Mean noise magnitude (power=1) or power (power=2) per bin, (N, F, 1).

    ``values`` is the noisy |Y|**power (N, F, frames).
    """
    if noise is not None:
        noise_arr = np.asarray(noise, dtype=np.float32)
        if noise_arr.ndim == 1:
            noise_arr = noise_arr[None]
        if noise_arr.ndim != 2 or noise_arr.shape[0] not in (1, values.shape[0]):
            raise ValueError(f"noise must be (T',) or (N, T') with N={values.shape[0]}, got shape {np.shape(noise)}")
        noise_spec, _, _ = _stft(noise_arr, n_fft, hop_length)
        estimate = (np.abs(noise_spec) ** power).mean(axis=2, keepdims=True)
        return np.broadcast_to(estimate, (values.shape[0], values.shape[1], 1))
    n_total = values.shape[2]
    if not 1 <= noise_frames <= n_total:
        raise ValueError(f"noise_frames must be between 1 and the {n_total} frames of a clip, got {noise_frames}")
    if noise_from == "leading":
        return values[:, :, :noise_frames].mean(axis=2, keepdims=True)
    if noise_from == "quietest":
        energy = values.sum(axis=1)  # (N, frames)
        quiet = np.argsort(energy, axis=1, kind="stable")[:, :noise_frames]  # (N, k)
        picked = np.take_along_axis(values, quiet[:, None, :], axis=2)
        return picked.mean(axis=2, keepdims=True)
    raise ValueError(f"noise_from must be 'leading' or 'quietest', got {noise_from!r}")
