#!/bin/sh
# A taskd handler in shell: counts the words of a job's "text" (jq reads the JSON).
#
#     taskd --handler wordcount='sh examples/handlers/wordcount.sh'
#
# One JSON line in per job on stdin, one JSON line out per job on stdout; stderr goes to
# taskd's log. A process or two per job: fine for slow jobs, not for thousands a second.
while IFS= read -r line; do
  id=$(printf '%s\n' "$line" | jq -r '.task_id')
  if [ "$(printf '%s\n' "$line" | jq -r '.job.text | type')" = string ]; then
    words=$(printf '%s\n' "$line" | jq -r '.job.text' | wc -w)
    printf '{"task_id":%s,"result":{"words":%d,"by":"sh"}}\n' "$id" "$words"
  else
    # retry: false, since running it again cannot help.
    printf '{"task_id":%s,"error":"the job needs a \\"text\\" string","retry":false}\n' "$id"
  fi
done
