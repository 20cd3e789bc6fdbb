// A taskd handler in Node.js: counts the words of a job's "text".
//
//     taskd --handler wordcount='node examples/handlers/wordcount.js'
//
// One JSON line in per job on stdin, one JSON line out per job on stdout; stderr goes to
// taskd's log.
const readline = require("node:readline");

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on("line", (line) => {
  const msg = JSON.parse(line);
  const text = msg.job.text;
  let answer;
  if (typeof text === "string") {
    const words = text.split(/\s+/).filter((w) => w.length > 0).length;
    answer = { task_id: msg.task_id, result: { words, by: "node" } };
  } else {
    // retry: false, since running it again cannot help.
    answer = { task_id: msg.task_id, error: 'the job needs a "text" string', retry: false };
  }
  // Writes to a pipe are synchronous on Linux: nothing waits in a buffer.
  process.stdout.write(JSON.stringify(answer) + "\n");
});
