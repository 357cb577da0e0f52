// N Socket.IO 4 clients with default transports (polling, then the upgrade to
// WebSocket), each with its own cookies (withCredentials keeps them in Node.js),
// join one room; one says something; prints what happened as one JSON line.
// Usage: node clients.js URL N ROOM
const { io } = require("socket.io-client");

const [url, n, room] = [process.argv[2], Number(process.argv[3]), process.argv[4]];
const result = { connected: 0, upgraded: 0, servers: {}, received: 0, errors: [] };

function client(i) {
  return new Promise((resolve) => {
    const socket = io(url, { forceNew: true, withCredentials: true, reconnection: false, timeout: 5000 });
    let done = false;
    const finish = (ok) => { if (!done) { done = true; resolve(ok ? socket : (socket.close(), null)); } };
    socket.on("connect_error", (e) => { result.errors.push(`${i}: ${e.message}`); finish(false); });
    socket.on("connect", () => {
      result.connected += 1;
      const engine = socket.io.engine;
      const joined = () => socket.emit("join", room, (server) => {
        result.servers[server] = (result.servers[server] || 0) + 1;
        finish(true);
      });
      if (engine.transport.name === "websocket") { result.upgraded += 1; joined(); }
      else engine.once("upgrade", () => { result.upgraded += 1; joined(); });
      setTimeout(() => { result.errors.push(`${i}: no upgrade`); finish(false); }, 8000);
    });
    socket.on("disconnect", (reason) => { if (!done) { result.errors.push(`${i}: ${reason}`); finish(false); } });
  });
}

async function main() {
  const sockets = (await Promise.all(Array.from({ length: n }, (_, i) => client(i)))).filter(Boolean);
  if (sockets.length > 0) {
    const heard = sockets.map((s) => new Promise((resolve) => {
      s.once("said", () => { result.received += 1; resolve(); });
      setTimeout(resolve, 5000);
    }));
    sockets[0].emit("say", room, "hello everyone");
    await Promise.all(heard);
  }
  console.log(JSON.stringify(result));
  sockets.forEach((s) => s.close());
  process.exit(0);
}

main();
