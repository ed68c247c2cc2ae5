"""Peak memory of decoding hostile and large files, and decode speed on normal ones.

Every case is a file that is small on disk: most declare 400 megapixels (or
inflate to gigabytes) in their headers; a few are large images the decoders
accept. Each decode runs in a fresh subprocess; its peak resident memory
(``VmHWM``, reset after the imports) is reported above its resident memory
after importing the decoders, next to what the decode reserved in the decode budget
(``images.DECODE_BUDGET``) before allocating.

The speed part decodes the full-size originals in ``../shared/data/originals``
(JPEG, and the same pictures stored as 12-bit DICOM) with this checkout and,
with ``--compare-with DIR``, with another checkout's ``pneumo_edge`` in the
same run, so that a fix's cost on normal files is a ratio measured here.

    python benchmarks/decode_memory.py [--compare-with ../main] [--out benchmarks/decode_memory]

Files are generated in a temporary folder and deleted; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ORIGINALS = ROOT.parent / "shared" / "data" / "originals"
MiB = 2**20

CHILD = r"""
import json, sys, threading, time
from pneumo_edge import images
from pneumo_edge.images import ImageDecodeError, decode_gray
import pydicom, pydicom.pixels  # imported before the baseline is taken
def hwm_kib():  # this process's peak resident memory (ru_maxrss would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
paths, target = json.loads(sys.argv[1]), json.loads(sys.argv[2])
base = hwm_kib()
open("/proc/self/clear_refs", "w").write("5")  # the peak restarts from the current size
base_now = hwm_kib()
results = [None] * len(paths)
def one(i):
    t = time.perf_counter()
    try:
        out = decode_gray(paths[i], target=target)
        results[i] = ["ok", f"{out.shape[1]}x{out.shape[0]}", time.perf_counter() - t]
    except ImageDecodeError as exc:
        results[i] = ["refused", str(exc), time.perf_counter() - t]
threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
for t in threads: t.start()
for t in threads: t.join()
peak = hwm_kib()
budget = getattr(getattr(images, "_BUDGET", None), "peak", None)
print(json.dumps({"results": results, "base_kib": base_now, "peak_kib": peak,
                  "import_peak_kib": base, "reserved": budget}))
"""

SPEED_CHILD = r"""
import json, sys, time
from pneumo_edge.images import decode_gray
paths, target, repeats = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
for p in paths[:2]:
    decode_gray(p, target=target)  # warm-up: imports, first-call costs
best = []
for _ in range(repeats):
    t = time.perf_counter()
    for p in paths:
        decode_gray(p, target=target)
    best.append((time.perf_counter() - t) / len(paths))
print(json.dumps({"ms_per_image": 1000 * min(best)}))
"""


#: Address-space limit for runs of the --compare-with decoder, whose hostile-file
#: decodes took several GB: they end in MemoryError instead of starving the machine.
COMPARE_LIMIT = 6 << 30


def run_child(src: Path, code: str, *args: str, limit: int | None = None) -> dict:
    import resource

    env = dict(os.environ, PYTHONPATH=str(src), OPENCV_LOG_LEVEL="ERROR")
    cap = None if limit is None else (lambda: resource.setrlimit(resource.RLIMIT_AS,
                                                                 (limit, limit)))
    # cwd = the checkout: ``python -c`` puts the current folder first on sys.path
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=900, preexec_fn=cap, cwd=str(src))
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- files


def jpeg_claiming(path: Path, width: int, height: int, progressive: bool = False,
                  colour: bool = False) -> Path:
    """A real 64 x 64 JPEG whose frame header is patched to ``width`` x ``height``."""
    rng = np.random.default_rng(0)
    small = (rng.random((64, 64, 3) if colour else (64, 64)) * 255).astype(np.uint8)
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    if colour:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    data = bytearray(cv2.imencode(".jpg", small, params)[1])
    sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    idat = zlib.compress(b"\0" * (width + 1) * 64)  # 64 rows of the 20000 declared
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def tiff_claiming(path: Path, width: int, height: int) -> Path:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8 + 2 + 12 * 8 + 4), (277, 3, 1, 1),
               (279, 4, 1, width * height)]
    body = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", len(entries))
    for tag, typ, n, value in entries:
        body += struct.pack("<HHII", tag, typ, n, value)
    path.write_bytes(body + struct.pack("<I", 0) + b"\0" * 4096)
    return path


def bmp_claiming(path: Path, width: int, height: int) -> Path:
    header = struct.pack("<2sIHHI", b"BM", 54 + 4096, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(header + info + b"\0" * 4096)
    return path


def j2k_claiming(width: int, height: int) -> bytes:
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, width, height, 0, 0, width, height, 0, 0, 1)
    return b"\xff\x4f\xff\x51" + siz + b"\x07\x01\x01" + b"\xff\x52" + b"\0" * 64 + b"\xff\xd9"


def scans_then_stuffing(path: Path, scans: int, stuffed: int) -> Path:
    frame = struct.pack(">BHHB", 8, 8, 8, 1) + bytes([1, 0x11, 0])
    head = b"\xff\xd8\xff\xc0" + struct.pack(">H", 2 + len(frame)) + frame
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    path.write_bytes(head + (sos + b"\x12\x34") * scans + sos + b"\xff\x00" * (stuffed // 2)
                     + b"\xff\xd9")
    return path


def make_cases(folder: Path) -> list[dict]:
    import dicom_factory as F

    J2K, RLE = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"
    side = 20000  # 400 MP
    gray = np.full((64, 64), 100, np.uint8)
    cases = [
        ("JPEG baseline declaring 20000x20000", jpeg_claiming(folder / "a.jpg", side, side), 400),
        ("JPEG progressive RGB 16000x16000", jpeg_claiming(folder / "b.jpg", 16000, 16000,
                                                            True, True), 256),
        ("PNG declaring 20000x20000", png_claiming(folder / "c.png", side, side), 400),
        ("TIFF declaring 20000x20000", tiff_claiming(folder / "d.tif", side, side), 400),
        ("BMP declaring 20000x20000", bmp_claiming(folder / "e.bmp", side, side), 400),
        ("DICOM native declaring 20000x20000",
         F.write_native(folder / "f.dcm", bytes(4096), side, side), 400),
        ("DICOM RLE 20000x20000", F.write_encapsulated(
            folder / "g.dcm", RLE, [F.rle_constant(side, side)], side, side), 400),
        ("DICOM J2K codestream 20000x20000, header 64x64", F.write_encapsulated(
            folder / "h.dcm", J2K, [j2k_claiming(side, side)], 64, 64), 400),
        ("DICOM deflate bomb (inflates to 2 GiB)",
         F.write_deflated(folder / "i.dcm", gray, zeros=2 << 30), 0),
        ("DICOM with 2 million elements", F.write_native(
            folder / "j.dcm", bytes(64), 8, 8, extra=F.many_elements(2_000_000)), 0),
        ("JPEG: 1000 tiny scans, then 40 MB of stuffed 0xFF00",
         scans_then_stuffing(folder / "k.jpg", 999, 40 * MiB), 0),
        ("DICOM RLE 9000x9000 (accepted)", F.write_encapsulated(
            folder / "l.dcm", RLE, [F.rle_constant(9000, 9000, 90)], 9000, 9000), 81),
    ]
    big = np.zeros((12000, 12000), np.uint8)
    big[::2] = 255
    png = folder / "m.png"
    cv2.imencode(".png", big, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tofile(str(png))
    jpg = folder / "n.jpg"
    cv2.imencode(".jpg", np.full((16000, 16000), 128, np.uint8))[1].tofile(str(jpg))
    del big
    cases += [("PNG 12000x12000 8-bit (accepted)", png, 144),
              ("JPEG baseline 16000x16000 grey (accepted)", jpg, 256)]
    return [{"case": name, "paths": [str(path)], "size_bytes": path.stat().st_size,
             "declared_mp": mp} for name, path, mp in cases]


# ----------------------------------------------------------------------------- speed


def dicom_copies(folder: Path, originals: list[Path]) -> list[Path]:
    """The originals as 12-bit MONOCHROME2 DICOM with a window (the usual CR/DX shape)."""
    import dicom_factory as F
    from pydicom.uid import ExplicitVRLittleEndian

    out = []
    for path in originals:
        gray = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_GRAYSCALE)
        ds = F.base_dataset(ExplicitVRLittleEndian)
        F._pixels(ds, (gray.astype(np.uint16) * 16), "MONOCHROME2", 12)
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
        target = folder / f"{path.stem}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="another checkout whose pneumo_edge is timed in the same run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "decode_memory")
    args = parser.parse_args()

    rows, speed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = make_cases(folder)
        rle = next(c for c in cases if c["case"].startswith("DICOM RLE 9000"))
        cases.append({**rle, "case": "4 x DICOM RLE 9000x9000 in 4 threads",
                      "paths": [rle["paths"][0]] * 4})
        for case in cases:
            for target in (224, None):
                if target is None and "accepted" not in case["case"]:
                    continue
                res = run_child(ROOT, CHILD, json.dumps(case["paths"]), json.dumps(target))
                row = {k: case[k] for k in ("case", "size_bytes", "declared_mp")}
                row["target"] = target
                if "error" in res:
                    row["error"] = res["error"]
                else:
                    row["outcome"] = res["results"][0][0]
                    row["detail"] = res["results"][0][1]
                    row["seconds"] = round(max(r[2] for r in res["results"]), 3)
                    row["peak_rss_mib"] = round(res["peak_kib"] / 1024, 1)
                    row["decode_peak_mib"] = round((res["peak_kib"] - res["base_kib"]) / 1024, 1)
                    row["reserved_mib"] = (None if res["reserved"] is None
                                           else round(res["reserved"] / MiB, 1))
                if args.compare_with:
                    old = run_child(args.compare_with.resolve(), CHILD,
                                    json.dumps(case["paths"]), json.dumps(target),
                                    limit=COMPARE_LIMIT)
                    if "error" in old:
                        row["before"] = f"crashed: {old['error'][:120]}"
                    else:
                        first = old["results"][0]
                        row["before"] = (f"{first[0]} in {max(r[2] for r in old['results']):.1f} s,"
                                         f" {(old['peak_kib'] - old['base_kib']) / 1024:.0f} MiB")
                rows.append(row)
                print(json.dumps(row), flush=True)

        if ORIGINALS.is_dir():
            originals = sorted(p for p in ORIGINALS.rglob("*") if p.suffix.lower() in
                               (".jpeg", ".jpg"))
            sets = {"JPEG originals": originals,
                    "same as 12-bit DICOM": dicom_copies(folder, originals)}
            sources = {"this checkout": ROOT}
            if args.compare_with:
                sources["compare-with"] = args.compare_with.resolve()
            for name, paths in sets.items():
                for target in (224, None):
                    entry = {"files": name, "n": len(paths), "target": target}
                    for _ in range(2):  # A B A B: a shared machine's load hits both alike
                        for label, src in sources.items():
                            res = run_child(src, SPEED_CHILD,
                                            json.dumps([str(p) for p in paths]),
                                            json.dumps(target), str(args.repeats))
                            ms = round(res.get("ms_per_image", float("nan")), 2)
                            entry[label] = min(entry.get(label, ms), ms)
                    if "compare-with" in entry:
                        entry["ratio"] = round(entry["this checkout"] / entry["compare-with"], 3)
                    speed.append(entry)
                    print(json.dumps(entry), flush=True)

    from pneumo_edge.images import DECODE_BUDGET

    meta = {"python": platform.python_version(), "opencv": cv2.__version__,
            "numpy": np.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
            "decode_budget_mib": DECODE_BUDGET // MiB,
            "compare_with": str(args.compare_with) if args.compare_with else None,
            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "memory": rows, "speed": speed}, indent=1))
    args.out.with_suffix(".md").write_text(render(meta, rows, speed))
    print(f"wrote {args.out.with_suffix('.md')} and .json")


def render(meta: dict, rows: list[dict], speed: list[dict]) -> str:
    lines = ["# Decoding: peak memory of hostile files, decode speed", "",
             f"Generated by `benchmarks/decode_memory.py` on {meta['created']} "
             f"({meta['cpus']} CPUs, Python {meta['python']}, OpenCV {meta['opencv']}). "
             f"Decode budget: {meta['decode_budget_mib']} MiB for all decodes in flight.", "",
             "Each row is a fresh subprocess. *decode peak* is its peak resident memory "
             "(VmHWM, reset after the imports) minus its resident memory after importing "
             "the decoders; *reserved* is the most the "
             "decode budget held (estimated from the header, before allocating).", "",
             "| file | on disk | declares | target | outcome | seconds | decode peak MiB "
             "| reserved MiB | before (--compare-with) |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        size = (f"{r['size_bytes'] / MiB:.1f} MiB" if r["size_bytes"] >= MiB
                else f"{r['size_bytes'] / 1024:.0f} KiB")
        outcome = r.get("error") or (f"{r['outcome']}: {r['detail']}")
        lines.append(f"| {r['case']} | {size} | {r['declared_mp'] or '-'} MP | "
                     f"{r['target'] or 'full'} | {outcome} | {r.get('seconds', '-')} | "
                     f"{r.get('decode_peak_mib', '-')} | {r.get('reserved_mib', '-')} | "
                     f"{r.get('before', '-')} |")
    if speed:
        lines += ["", "## Decode speed on the full-size originals (ms per image, best of "
                  "repeats in two alternating runs of each decoder)", ""]
        cols = [k for k in speed[0] if k not in ("files", "n", "target")]
        lines.append("| files | n | target | " + " | ".join(cols) + " |")
        lines.append("| --- | ---: | ---: |" + " ---: |" * len(cols))
        for s in speed:
            lines.append(f"| {s['files']} | {s['n']} | {s['target'] or 'full'} | "
                         + " | ".join(str(s.get(c, "")) for c in cols) + " |")
    if meta["compare_with"]:
        lines += ["", "*before* / *compare-with*: the decoder before the decode budget (the "
                  "checkout given by `--compare-with`, run with a "
                  f"{COMPARE_LIMIT >> 30} GiB address-space limit); *ratio* = this checkout "
                  "/ it, measured in the same run."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
