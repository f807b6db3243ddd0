// chat-svc page: the line protocol over a WebSocket, nothing more.
// Every line is shown with textContent, never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const root = document.documentElement;
  const log = $("log"), below = $("below"), form = $("form"), input = $("input");
  const prompt = $("prompt"), state = $("state"), roomEl = $("room"), countEl = $("count");

  const TOKEN = "chat-svc-token";   // sessionStorage key: the token lives as long as the tab
  const KEEP_LINES = 2000;          // older lines leave the page
  const MAX_DELAY_MS = 30000;

  let ws = null;
  let nick = null, room = "lobby", count = null;
  let chosenNick = null, chosenRoom = null;   // restored after a reconnect
  let startRoom = null;                       // the first welcome's room
  // Message ids (docs/protocol.md): the last id shown per room; the /ids the page sent and not
  // yet seen answered; whether this connection has them on; the /resume being answered.
  const lastIds = new Map();
  let idsAsked = 0, idsOn = false, replay = null;
  let connNick = null;                        // this connection's first nick: its arrival is ours
  let failures = 0, retryTimer = null;
  let stopped = false, askingToken = false;
  let quietWho = 0;                           // /who replies the page asked for itself
  const sent = [];
  let recall = 0;

  function wsUrl() {
    const port = root.dataset.chatPort;       // set when the page came from --metrics-port
    if (port) {
      return `${root.dataset.chatTls === "1" ? "wss" : "ws"}://${location.hostname}:${port}/ws`;
    }
    return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  }

  function atBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 8;
  }

  function show(text, kind) {
    const stick = atBottom();
    const item = document.createElement("li");
    item.textContent = text;
    if (kind) item.className = kind;
    log.append(item);
    while (log.childElementCount > KEEP_LINES) log.firstElementChild.remove();
    if (stick) log.scrollTop = log.scrollHeight;
    else below.hidden = false;
  }

  function kindOf(line) {
    if (line.startsWith("! ")) return "error";
    if (line.startsWith("[history] ")) return "history";
    if (line.startsWith("* ")) return "notice";
    if (/^\[[^\]\s]+ -> [^\]\s]+\] /.test(line)) return "private";
    return "";
  }

  function setState(text, kind) {
    state.textContent = text;
    state.dataset.state = kind;
  }

  function showRoom() {
    roomEl.textContent = room;
    countEl.textContent = count === null ? "" : `${count} ${count === 1 ? "member" : "members"}`;
    prompt.textContent = askingToken ? "access token" : (nick || "message");
  }

  function send(line) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(line + "\n");
  }

  function askWho() {
    quietWho += 1;
    send("/who");
  }

  function askIds() {
    idsAsked += 1;
    send("/ids");
  }

  const roomKey = (name) => name.replace(/^#/, "").toLowerCase();

  // Record a line's id in its room; false when the line was shown already.
  function noteId(where, id) {
    const last = lastIds.get(roomKey(where));
    if (last && last[0] === id[0] && id[1] <= last[1]) return false;
    lastIds.set(roomKey(where), id);
    return true;
  }

  // A replayed line about this user: what it said (shown as typed), its comings, goings, renames.
  function ours(line) {
    const nicks = [nick, chosenNick, connNick].filter(Boolean);
    let m;
    if ((m = /^(?:\* )?\[([^\]\s]+)\] /.exec(line)) || (m = /^\* (\S+) (?:joined|left) \S+$/.exec(line))) {
      return nicks.includes(m[1]);
    }
    m = /^\* (\S+) is now known as (\S+)$/.exec(line);
    return m !== null && (nicks.includes(m[1]) || nicks.includes(m[2]));
  }

  // Every line from the server: ids stripped; room lines held while a /resume is answered.
  function receive(raw) {
    const m = /^@([A-Za-z0-9]{1,16}):(\d{1,18}) /.exec(raw);
    if (!m) {
      read(raw);
      return;
    }
    const id = [m[1], Number(m[2])], line = raw.slice(m[0].length);
    if (replay) {
      if (id[0] === replay.since[0] && id[1] > replay.since[1]) replay.held.push([id, line]);
    } else if (noteId(room, id)) {
      read(line);
    }
  }

  // The answer to the page's own /resume; false when ``line`` is not it.
  function answered(line) {
    const m = /^\* resumed (\S+): (\d+) lines$/.exec(line) || /^! resume incomplete (\S+): (.+)$/.exec(line);
    if (!m || roomKey(m[1]) !== roomKey(replay.room)) return false;
    const held = replay.held;
    replay = null;
    room = m[1];
    count = null;
    if (line.startsWith("!")) {
      show(`* could not resume ${room}: lines may be missing (${m[2]})`, "error");
    } else {
      let shown = 0;
      for (const [id, text] of Number(m[2]) > 0 ? held.slice(-Number(m[2])) : []) {
        if (noteId(room, id) && !ours(text)) {
          read(text);
          shown += 1;
        }
      }
      show(`* resumed ${shown} lines`, "notice");
    }
    askWho();
    showRoom();
    return true;
  }

  // What the page learns from the server's lines (docs/protocol.md has them all).
  function read(line) {
    let m;
    if (line === "* ids on" && idsAsked > 0) {
      idsAsked -= 1;
      idsOn = true;
      if (idsAsked === 0 && replay) {   // its answer follows the /resume's: the server refused it
        show(`* could not resume ${replay.room}: you are in ${room}`, "error");
        replay = null;
      }
      return;
    }
    if (replay && answered(line)) return;
    if (replay && !idsOn && !line.startsWith("! ")) {
      return;                           // the first room's history and lines: not where we are going
    }
    if ((m = /^\* welcome to chat-svc, you are (\S+) in (?:room )?([^\s;,]+)[;,]/.exec(line))) {
      nick = connNick = m[1];
      room = m[2];
      startRoom = startRoom || room;
      count = null;
      failures = 0;
      setState("connected", "connected");
      askIds();
      if (chosenNick && chosenNick !== nick) send(`/nick ${chosenNick}`);
      const target = chosenRoom || startRoom;
      const since = lastIds.get(roomKey(target));
      if (since) {                      // resume where we were; /ids again closes a refused /resume
        replay = { room: target, since, held: [] };
        send(`/resume ${target} ${since[0]}:${since[1]}`);
        askIds();
      } else if (chosenRoom && chosenRoom !== room) {
        send(`/join ${chosenRoom}`);
      } else {
        askWho();
      }
    } else if ((m = /^\* you joined (\S+)$/.exec(line))) {
      room = chosenRoom = m[1];
      count = null;
      askWho();
    } else if ((m = /^\* (\S+) is now known as (\S+)$/.exec(line)) && m[1] === nick) {
      nick = chosenNick = m[2];
    } else if ((m = /^\* in (\S+) \((\d+)\):/.exec(line))) {
      count = Number(m[2]);
      if (quietWho > 0) {
        quietWho -= 1;
        showRoom();
        return;
      }
    } else if ((m = /^\* (\S+) (joined|left) (\S+)$/.exec(line)) && m[3] === room && count !== null) {
      count += m[2] === "joined" ? 1 : -1;
    } else if ((m = /^\* ([^\s:]+): \d+ more /.exec(line)) && m[1] === room) {
      askWho(); // notices summed up under churn: the count is no longer known from them
    } else if (/^! authentication (required|failed)/.test(line)) {
      askForToken();
    }
    showRoom();
    show(line, kindOf(line));
  }

  function askForToken() {
    askingToken = true;
    sessionStorage.removeItem(TOKEN);
    input.type = "password";
    input.placeholder = "access token, then Enter";
    input.value = "";
    input.focus();
    showRoom();
  }

  function connect() {
    clearTimeout(retryTimer);
    stopped = false;
    setState("connecting…", "connecting");
    const sock = new WebSocket(wsUrl());
    ws = sock;
    let partial = "";
    idsAsked = 0;
    idsOn = false;
    replay = null;
    sock.onopen = () => {
      const token = sessionStorage.getItem(TOKEN);
      if (token) sock.send(`/auth ${token}\n`);
    };
    sock.onmessage = (event) => {
      const lines = (partial + event.data).split("\n");
      partial = lines.pop();
      for (const line of lines) receive(line);
    };
    sock.onclose = (event) => {
      if (ws !== sock) return;
      ws = null;
      const why = event.reason || (event.code === 1006 ? "connection lost" : `code ${event.code}`);
      if (askingToken) {
        setState("access token required", "closed");
      } else if (stopped || event.code === 1000) {
        stopped = true;
        setState(`disconnected (${why}); press Enter to reconnect`, "closed");
      } else {
        // Exponential backoff with jitter, so a restarted server is not hit by every page at once.
        const delay = Math.min(MAX_DELAY_MS, 500 * 2 ** failures) * (0.5 + Math.random() / 2);
        failures += 1;
        setState(`disconnected (${why}); reconnecting in ${Math.ceil(delay / 1000)} s`, "retrying");
        retryTimer = setTimeout(connect, delay);
      }
    };
  }

  function echo(text) {
    // The server never echoes your own lines back; show them here.
    if (text.startsWith("//") || !text.startsWith("/")) {
      show(`[${nick}] ${text.startsWith("//") ? text.slice(1) : text}`, "mine");
    } else if (/^\/me\s+\S/i.test(text)) {
      show(`* [${nick}] ${text.slice(3).trim()}`, "mine");
    } else if (/^\/quit\b/i.test(text)) {
      stopped = true;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (askingToken) {
      if (!text) return;
      sessionStorage.setItem(TOKEN, text);
      askingToken = false;
      input.type = "text";
      input.placeholder = "say something, or /help";
      input.value = "";
      showRoom();
      connect();
      return;
    }
    if (!ws) {
      if (stopped) connect();
      return;
    }
    if (!text || ws.readyState !== WebSocket.OPEN) return;
    send(text);
    echo(text);
    sent.push(text);
    recall = sent.length;
    input.value = "";
    log.scrollTop = log.scrollHeight;
  });

  // Up and Down recall what you sent; Escape clears the line.
  input.addEventListener("keydown", (event) => {
    if (askingToken) return;
    if (event.key === "ArrowUp" && recall > 0) {
      recall -= 1;
      input.value = sent[recall];
      event.preventDefault();
    } else if (event.key === "ArrowDown" && recall < sent.length) {
      recall += 1;
      input.value = sent[recall] || "";
      event.preventDefault();
    } else if (event.key === "Escape") {
      input.value = "";
    }
  });

  log.addEventListener("scroll", () => {
    if (atBottom()) below.hidden = true;
  });
  below.addEventListener("click", () => {
    log.scrollTop = log.scrollHeight;
    below.hidden = true;
    input.focus();
  });

  showRoom();
  connect();
})();
