#!/usr/bin/env python3
"""Stream a synthetic recording to ``stream_classifier`` and print each chunk's label as it arrives.

    elastiserve serve --model-repository=examples/streaming/models &
    python examples/streaming/client.py [--url 127.0.0.1:8001] [--seconds 3]

The "recording" is a sequence of tones (low 250 Hz, mid 1 kHz, high 3 kHz) with noise, one tone
per segment. It is sent in one request over gRPC's bidirectional stream (tritonclient's
``start_stream`` / ``async_stream_infer``); the decoupled model answers chunk by chunk. The
script checks every label against the tone that was played and exits 1 on a mistake.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient

SAMPLE_RATE = 8000
CHUNK = 256
TONES = {"low": 250.0, "mid": 1000.0, "high": 3000.0}


def synthetic_recording(seconds: float, seed: int = 7) -> tuple[np.ndarray, list[str]]:
    """A signal of tone segments (8 chunks each) and the true label of every chunk."""
    rng = np.random.default_rng(seed)
    chunks = int(seconds * SAMPLE_RATE) // CHUNK
    names = list(TONES)
    segments = rng.choice(names, size=chunks // 8 + 1)
    truth = [str(segments[i // 8]) for i in range(chunks)]
    t = np.arange(chunks * CHUNK) / SAMPLE_RATE
    freq = np.repeat([TONES[label] for label in truth], CHUNK)
    signal = np.sin(2 * np.pi * freq * t) + 0.1 * rng.standard_normal(len(t))
    return signal.astype(np.float32), truth


@dataclass
class StreamResult:
    labels: dict[int, str] = field(default_factory=dict)
    arrival: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    finished: float = 0.0


def classify_stream(url: str, audio: np.ndarray, timeout: float = 60.0, verbose: bool = False) -> StreamResult:
    """Send ``audio`` once and collect the chunk answers until the final (empty) response."""
    answers: queue.Queue[tuple[grpcclient.InferResult | None, Exception | None]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    result = StreamResult()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        audio_input = grpcclient.InferInput("AUDIO", [len(audio)], "FP32")
        audio_input.set_data_from_numpy(audio)
        started = time.perf_counter()
        client.async_stream_infer("stream_classifier", [audio_input], enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if error is not None:
                result.errors.append(str(error))
                continue
            assert answer is not None
            final = answer.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                result.finished = time.perf_counter() - started
                break
            index = int(answer.as_numpy("INDEX")[0])
            result.labels[index] = answer.as_numpy("LABEL")[0].decode()
            result.arrival[index] = time.perf_counter() - started
            if verbose:
                score = float(answer.as_numpy("SCORE")[0])
                print(f"{result.arrival[index] * 1000:8.2f} ms  chunk {index:3d}  {result.labels[index]:<4}  {score:.3f}")
    finally:
        client.stop_stream()
        client.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the synthetic recording")
    args = parser.parse_args()
    audio, truth = synthetic_recording(args.seconds)
    result = classify_stream(args.url, audio, verbose=True)
    wrong = [i for i, label in enumerate(truth) if result.labels.get(i) != label]
    print(
        f"{len(result.labels)}/{len(truth)} chunks answered, {len(wrong)} wrong; first answer after "
        f"{min(result.arrival.values(), default=0) * 1000:.1f} ms, all after {result.finished * 1000:.1f} ms"
    )
    for message in result.errors:
        print(f"error: {message}", file=sys.stderr)
    return 0 if not wrong and not result.errors and result.finished else 1


if __name__ == "__main__":
    sys.exit(main())
