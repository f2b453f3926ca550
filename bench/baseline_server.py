"""Serve the batch-1 HF `generate` baseline behind the same HTTP app as `m2pt serve` (benchmark use only).

python -m bench.baseline_server --model DIR --store DIR --port 8001
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import uvicorn

    from bench.baseline_engine import HFGenerateBatch1Engine
    from m2pt.loading import load_frozen_llava
    from server.app import create_app
    from server.engine_settings import open_store_from_settings
    from server.settings import Settings

    settings = Settings(model=args.model, store=args.store, port=args.port, max_queue=512)
    store, limits = open_store_from_settings(settings)
    frozen = load_frozen_llava(args.model, device="cpu", dtype="float32")
    engine = HFGenerateBatch1Engine(frozen, store, limits, model_id=Path(args.model).name)
    uvicorn.run(create_app(settings, engine=engine), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
