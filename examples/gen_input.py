"""Write KB kibibytes of test data of a given KIND to stdout (text, random, or repetitive)."""
import random
import sys

kind, kb = sys.argv[1], int(sys.argv[2])
rng = random.Random(kb)
size = kb * 1024
if kind == "random":
    data = rng.randbytes(size)
elif kind == "text":
    words = [w.encode() for w in "the quick brown fox jumps over a lazy dog while sweeps run".split()]
    parts, total = [], 0
    while total < size:
        w = rng.choice(words) + b" "
        parts.append(w)
        total += len(w)
    data = b"".join(parts)[:size]
else:
    data = (b"ticketfarm " * (size // 11 + 1))[:size]
sys.stdout.buffer.write(data)
