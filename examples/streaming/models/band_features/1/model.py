"""Log energy per frequency band of each chunk: low (< 500 Hz), mid (500-1500 Hz), high (> 1500 Hz).

A stand-in for a real front end (log-mel filterbanks); batched: one FFT over every chunk of
the batch.
"""

import itertools

import numpy as np
import triton_python_backend_utils as pb_utils

SAMPLE_RATE = 8000
EDGES_HZ = (0, 500, 1500, SAMPLE_RATE // 2 + 1)


class TritonPythonModel:
    def initialize(self, args):
        freqs = np.fft.rfftfreq(256, d=1.0 / SAMPLE_RATE)
        self.bands = [(freqs >= lo) & (freqs < hi) for lo, hi in itertools.pairwise(EDGES_HZ)]
        self.window = np.hanning(256).astype(np.float32)

    def execute(self, requests):
        chunks = [pb_utils.get_input_tensor_by_name(r, "CHUNK").as_numpy() for r in requests]
        sizes = [len(c) for c in chunks]
        power = np.abs(np.fft.rfft(np.concatenate(chunks) * self.window, axis=1)) ** 2
        features = np.stack([np.log1p(power[:, band].sum(axis=1)) for band in self.bands], axis=1)
        responses, start = [], 0
        for size in sizes:
            out = features[start : start + size].astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("FEATURES", out)]))
            start += size
        return responses
