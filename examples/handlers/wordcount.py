#!/usr/bin/env python3
"""A taskd handler in Python: counts the words of a job's "text".

    taskd --handler wordcount='python3 examples/handlers/wordcount.py'

One JSON line in per job on stdin, one JSON line out per job on stdout (flushed); stderr goes to
taskd's log.
"""
import json
import sys

for line in sys.stdin:
    msg = json.loads(line)
    text = msg["job"].get("text")
    if isinstance(text, str):
        answer = {"task_id": msg["task_id"], "result": {"words": len(text.split()), "by": "python"}}
    else:
        # retry: false, since running it again cannot help.
        answer = {"task_id": msg["task_id"], "error": "the job needs a \"text\" string", "retry": False}
    print(json.dumps(answer), flush=True)
