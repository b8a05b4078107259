"""Tasks: one module per task with everything that knows its format (prompt text, answer
extraction, grading, conversion of the official release). Below data/, evaluation/ and ppo/,
which import it; it imports only the record-file helpers of records.py."""
