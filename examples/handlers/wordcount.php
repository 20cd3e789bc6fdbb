<?php
// A taskd handler in PHP: counts the words of a job's "text".
//
//     taskd --handler wordcount='php examples/handlers/wordcount.php'
//
// One JSON line in per job on stdin, one JSON line out per job on stdout; stderr goes to
// taskd's log.

while (($line = fgets(STDIN)) !== false) {
    $msg = json_decode($line, true);
    $text = $msg['job']['text'] ?? null;
    if (is_string($text)) {
        $words = count(preg_split('/\s+/', $text, -1, PREG_SPLIT_NO_EMPTY));
        $answer = ['task_id' => $msg['task_id'], 'result' => ['words' => $words, 'by' => 'php']];
    } else {
        // retry: false, since running it again cannot help.
        $answer = ['task_id' => $msg['task_id'], 'error' => 'the job needs a "text" string', 'retry' => false];
    }
    fwrite(STDOUT, json_encode($answer) . "\n");
    fflush(STDOUT);
}
