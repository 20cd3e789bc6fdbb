// The same load over WebSocket and over TCP, from one client implementation, against one
// daemon: C connections, at most W jobs outstanding each, for S seconds.
//
//   target/release/taskd --port 0 --ws-port 0 --simulate-ms 0 --outbox /tmp/o.log --log-level warn
//   node --experimental-websocket benches/ws_vs_tcp.mjs TCP_ADDR WS_ADDR [C] [W] [S]
import net from "node:net";

const [tcpAddr, wsAddr, C = "8", W = "64", S = "5"] = process.argv.slice(2);
const conns = +C, window = +W, seconds = +S;

function run(open) {
  return new Promise(resolve => {
    let done = 0, stop = false, closed = 0, n = 0;
    const finish = () => { if (++closed === conns) resolve(done); };
    for (let c = 0; c < conns; c++) {
      open((send, onLine, close) => {
        let outstanding = 0;
        const refill = () => {
          let batch = "";
          while (!stop && outstanding < window) { batch += `user${n++}@example.com\n`; outstanding++; }
          if (batch) send(batch);
        };
        onLine(line => {
          if (line.includes('"event":"done"')) { done++; outstanding--; refill(); }
          if (stop && outstanding === 0) close(finish);
        });
        refill();
      });
    }
    setTimeout(() => { stop = true; }, seconds * 1000);
  });
}

function tcp(ready) {
  const [host, port] = tcpAddr.split(":");
  const s = net.connect(+port, host);
  let buf = "", handler;
  s.setEncoding("utf8");
  s.on("data", d => { buf += d; let i; while ((i = buf.indexOf("\n")) >= 0) { handler(buf.slice(0, i)); buf = buf.slice(i + 1); } });
  s.on("connect", () => ready(b => s.write(b), h => { handler = h; }, cb => { s.end(); cb(); }));
}

function ws(ready) {
  const s = new WebSocket(`ws://${wsAddr}/`);
  let handler;
  s.onmessage = ev => handler(ev.data);
  s.onopen = () => ready(b => s.send(b), h => { handler = h; }, cb => { s.close(); cb(); });
}

for (const [name, open] of [["tcp", tcp], ["websocket", ws], ["tcp", tcp], ["websocket", ws]]) {
  const t = process.hrtime.bigint();
  const jobs = await run(open);
  const secs = Number(process.hrtime.bigint() - t) / 1e9;
  console.log(`${name.padEnd(9)} ${conns} conns x window ${window}: ${Math.round(jobs / secs)} jobs/s`);
}
