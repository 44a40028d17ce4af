"""Moved. The iHarmony4 benchmark's command line is ``commands/benchmark.py``; this name only says so."""
import sys

if __name__ == "__main__":
    print("comfyui_harmonize.pipelines.benchmark moved: run `harmonize-benchmark ...` or "
          "`python -m comfyui_harmonize.commands.benchmark ...` (with `accelerate launch ... -m "
          "comfyui_harmonize.commands.benchmark ...` for several GPUs); the options are unchanged.", file=sys.stderr)
    sys.exit(2)
