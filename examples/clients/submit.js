// Submits one job to taskd and prints its replies until the final one.
//
//     node examples/clients/submit.js [HOST:PORT] [JOB_JSON]
const net = require("node:net");
const readline = require("node:readline");

const [host, port] = (process.argv[2] ?? "127.0.0.1:9501").split(/:(?=[^:]*$)/);
const job = process.argv[3] ?? '{"type":"wordcount","text":"hello from node"}';

const sock = net.createConnection({ host, port: Number(port) }, () => sock.write(job + "\n"));
sock.on("error", (e) => { console.error(`${host}:${port}: ${e.message}`); process.exit(1); });
readline.createInterface({ input: sock }).on("line", (line) => {   // one reply per line
  console.log(line);
  if (["done", "failed", "cancelled", "error"].includes(JSON.parse(line).event)) {
    sock.end();                                       // accepted, [retrying…], then the final one
  }
});
