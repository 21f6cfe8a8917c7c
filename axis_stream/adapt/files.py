"""The files of a Stage 2 job folder (torch-free, so the CLI can name them without loading torch)."""

LAMBDA_FILE = "lambda.safetensors"
HEAD_FILE = "head.safetensors"
REPORT_FILE = "report.json"
STATE_FILE = "state.pt"
