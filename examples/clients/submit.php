<?php
// Submits one job to taskd and prints its replies until the final one.
//
//     php examples/clients/submit.php [HOST:PORT] [JOB_JSON]

$addr = $argv[1] ?? '127.0.0.1:9501';
$job = $argv[2] ?? '{"type":"wordcount","text":"hello from php"}';

$sock = stream_socket_client("tcp://$addr", $errno, $errstr, 5) or exit("$addr: $errstr\n");
fwrite($sock, $job . "\n");                            // one request per line
while (($line = fgets($sock)) !== false) {             // one reply per line
    echo $line;
    $reply = json_decode($line, true);
    if (in_array($reply['event'], ['done', 'failed', 'cancelled', 'error'])) {
        break;                                         // accepted, [retrying…], then the final one
    }
}
fclose($sock);
