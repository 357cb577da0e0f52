// A Socket.IO 4 server for tests/socketio.rs: several of them behind wsgate
// broadcast to each other through the Redis adapter.
// Usage: node server.js PORT REDIS_URL NAME
const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const [port, redisUrl, name] = process.argv.slice(2);

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const server = http.createServer();
  const io = new Server(server, { adapter: createAdapter(pub, sub) });
  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      socket.join(room);
      ack(name);
    });
    socket.on("say", (room, text) => io.to(room).emit("said", text));
  });
  server.listen(Number(port), "127.0.0.1", () => console.log(`ready ${name}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
