"""Moved. The training commands' command line is ``commands/train.py``; this name only says so."""
import sys

if __name__ == "__main__":
    print("comfyui_harmonize.pipelines.train_diffharmony moved: run `harmonize-train-diffharmony ...` or "
          "`python -m comfyui_harmonize.commands.train diffharmony ...` (with `accelerate launch ... -m "
          "comfyui_harmonize.commands.train diffharmony ...` for several GPUs); the options are unchanged.",
          file=sys.stderr)
    sys.exit(2)
