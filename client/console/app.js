// RaftMQ console: one page, four views (cluster, topics, consumer groups,
// messages), each reading the console's JSON API, which forwards to the
// brokers' admin API. No framework, no build step.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const page = $("#page");
let mode = { read_only: true, needs_key: false };
let timer = null;
// Bumped by every navigation: a view still loading when the user moves on
// sees a newer number and neither draws nor starts its refresh timer.
let navigation = 0;
// Per group: the last counters seen and a rolling window of rates.
const rates = {};
const WINDOW = 60;

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function banner(text, ok = false) {
  const b = $("#banner");
  b.textContent = text;
  b.className = ok ? "ok" : "";
  b.hidden = !text;
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("raftmq-admin-key");
  if (key) headers["X-Admin-Key"] = key;
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const v = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(v.error || `HTTP ${r.status}`);
  return v;
}

// Runs a write action after confirmation; reports the outcome.
async function act(question, method, path, body, then) {
  if (question && !confirm(question)) return;
  try {
    const v = await api(method, path, body);
    banner(v.message || "done", true);
    if (then) await then(v);
  } catch (e) {
    banner(e.message);
  }
}

// ---------------------------------------------------------------- cluster --

function chart(points) {
  const w = 240, h = 50;
  const max = Math.max(1, ...points.map((p) => Math.max(p.p, p.c)));
  const line = (k) => points.map((p, i) => `${(i * w) / (WINDOW - 1)},${h - (p[k] / max) * (h - 4)}`).join(" ");
  return `<svg class="chart" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}">
    <polyline fill="none" stroke="#4f8cff" stroke-width="1.5" points="${line("p")}"/>
    <polyline fill="none" stroke="#2fb36b" stroke-width="1.5" points="${line("c")}"/></svg>`;
}

function trackRates(g) {
  const now = Date.now();
  const produced = g.nodes.reduce((s, n) => s + (n.messages_produced || 0), 0);
  const consumed = g.nodes.reduce((s, n) => s + (n.messages_consumed || 0), 0);
  const r = rates[g.name] || (rates[g.name] = { points: [] });
  if (r.at) {
    const dt = (now - r.at) / 1000;
    // Counters restart with a node: never a negative rate.
    r.points.push({ p: Math.max(0, produced - r.produced) / dt, c: Math.max(0, consumed - r.consumed) / dt });
    if (r.points.length > WINDOW) r.points.shift();
  }
  Object.assign(r, { at: now, produced, consumed });
  return r.points;
}

function clusterView(data) {
  const groups = data.groups.map((g) => {
    const leader = g.nodes.find((n) => n.role === "leader");
    const lag = {};
    (leader?.followers || []).forEach((f) => (lag[f.node_id] = f.lag));
    const points = trackRates(g);
    const last = points[points.length - 1] || { p: 0, c: 0 };
    const rows = g.nodes.map((n) => `
      <tr data-node="${n.node_id}">
        <td>${n.node_id}</td><td>${esc(n.address)}</td>
        <td><span class="role ${esc(n.role)}">${esc(n.role)}</span></td>
        <td>${n.term}</td><td>${n.commit_index}</td><td>${n.applied_index}</td>
        <td>${n.role === "leader" ? "-" : lag[n.node_id] ?? "?"}</td>
        <td>${n.reads_served} <span class="muted">(${n.follower_reads_served} follower)</span></td>
        <td>${(n.disk_bytes / 1048576).toFixed(1)} MiB</td>
        <td>${n.registered === null ? '<span class="muted">?</span>' : n.registered ? "up" : '<span class="down">down</span>'}</td>
        <td class="write">
          ${n.role !== "leader" && n.role !== "unreachable" ? `<button class="transfer" data-node="${n.node_id}">make leader</button>` : ""}
          <button class="remove danger" data-node="${n.node_id}">remove</button>
        </td>
      </tr>`).join("");
    return `<section data-group="${esc(g.name)}">
      <h2>Group ${esc(g.name)} · <span class="leader-name" data-group="${esc(g.name)}">${leader ? `leader: node ${leader.node_id} (${esc(leader.address)})` : "no leader"}</span></h2>
      ${g.error ? `<p class="down">${esc(g.error)}</p>` : ""}
      <div class="tps"><div>produce <b>${last.p.toFixed(1)}</b> msg/s</div><div>consume <b>${last.c.toFixed(1)}</b> msg/s</div>${chart(points.length ? points : [{ p: 0, c: 0 }])}<span class="muted">last 2 min: <span style="color:#4f8cff">produce</span>, <span style="color:#2fb36b">consume</span></span></div>
      <table><thead><tr><th>node</th><th>address</th><th>role</th><th>term</th><th>commit</th><th>applied</th><th>lag</th><th>reads served</th><th>disk</th><th>name server</th><th class="write"></th></tr></thead>
      <tbody>${rows}</tbody></table>
      <form class="write add-node"><label>node id<input name="node_id" type="number" min="1" required></label>
        <label>address<input name="address" placeholder="host:port" required></label><button>add node</button></form>
    </section>`;
  });
  const ns = data.namesrv_error ? `<p class="down">name server ${esc(data.namesrv)}: ${esc(data.namesrv_error)}</p>` : `<p class="muted">name server ${esc(data.namesrv)}</p>`;
  return ns + groups.join("");
}

// The add-node forms' typed values (and which field has focus), so the
// refresh does not wipe what an operator is typing.
function saveForms() {
  const saved = {};
  page.querySelectorAll("section[data-group] form.add-node input").forEach((i) => {
    const g = i.closest("section").dataset.group;
    saved[`${g}\u0000${i.name}`] = { value: i.value, focus: document.activeElement === i, start: i.selectionStart, end: i.selectionEnd };
  });
  return saved;
}

function restoreForms(saved) {
  page.querySelectorAll("section[data-group] form.add-node input").forEach((i) => {
    const s = saved[`${i.closest("section").dataset.group}\u0000${i.name}`];
    if (!s) return;
    i.value = s.value;
    if (s.focus) {
      i.focus();
      try {
        i.setSelectionRange(s.start, s.end);
      } catch (_) {
        // number inputs have no selection
      }
    }
  });
}

async function showCluster() {
  const mine = navigation;
  const render = async () => {
    try {
      const data = await api("GET", "/api/cluster");
      if (mine !== navigation) return;
      const saved = saveForms();
      page.innerHTML = clusterView(data);
      restoreForms(saved);
      page.querySelectorAll("button.transfer").forEach((b) =>
        b.addEventListener("click", () => act(`Hand leadership to node ${b.dataset.node}?`, "POST", "/api/leader", { node_id: Number(b.dataset.node) }, render)));
      page.querySelectorAll("button.remove").forEach((b) =>
        b.addEventListener("click", () => act(`Remove node ${b.dataset.node} from the group (membership change)?`, "DELETE", `/api/nodes/${b.dataset.node}`, undefined, render)));
      page.querySelectorAll("form.add-node").forEach((f) =>
        f.addEventListener("submit", (e) => {
          e.preventDefault();
          const d = new FormData(f);
          act(`Add node ${d.get("node_id")} at ${d.get("address")}?`, "POST", "/api/nodes", { node_id: Number(d.get("node_id")), address: d.get("address") }, render);
        }));
    } catch (e) {
      banner(e.message);
    }
  };
  await render();
  if (mine === navigation) timer = setInterval(render, 2000);
}

// ----------------------------------------------------------------- topics --

async function showTopics() {
  const mine = navigation;
  const { topics } = await api("GET", "/api/topics");
  if (mine !== navigation) return;
  const rows = topics.map((t) => `
    <tr data-topic="${esc(t.name)}"><td><a href="#topics" class="expand">${esc(t.name)}</a></td><td>${t.message_type}</td><td>${t.queues}</td><td>${t.messages}</td>
      <td class="write"><button class="delete danger" data-topic="${esc(t.name)}">delete</button></td></tr>
    <tr class="queues" hidden><td colspan="5"><table><tr><th>queue</th><th>min offset</th><th>max offset</th><th>messages</th></tr>
      ${t.queue_offsets.map((q) => `<tr><td>${q.queue}</td><td>${q.min_offset}</td><td>${q.max_offset}</td><td>${q.messages}</td></tr>`).join("")}</table></td></tr>`).join("");
  page.innerHTML = `
    <section class="write"><h2>Create or update a topic</h2>
      <form id="topic-form"><label>name<input id="topic-name" name="name" required></label>
        <label>queues<input id="topic-queues" name="queues" type="number" min="1" max="1024" value="8"></label>
        <label>type<select name="message_type"><option>normal</option><option>fifo</option><option>delay</option><option>transaction</option></select></label>
        <label>update existing<input name="update" type="checkbox"></label>
        <button id="topic-create">save</button></form></section>
    <section><h2>Topics</h2><table id="topics"><thead><tr><th>name</th><th>type</th><th>queues</th><th>messages</th><th class="write"></th></tr></thead><tbody>${rows}</tbody></table></section>`;
  page.querySelectorAll("a.expand").forEach((a) => a.addEventListener("click", (e) => {
    e.preventDefault();
    const next = a.closest("tr").nextElementSibling;
    next.hidden = !next.hidden;
  }));
  page.querySelectorAll("button.delete").forEach((b) =>
    b.addEventListener("click", () => act(`Delete topic ${b.dataset.topic} and its messages?`, "DELETE", `/api/topics/${encodeURIComponent(b.dataset.topic)}`, undefined, showTopics)));
  $("#topic-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const d = new FormData(e.target);
    const body = { name: d.get("name"), queues: Number(d.get("queues")), message_type: d.get("message_type"), update: d.get("update") === "on" };
    act(`${body.update ? "Update" : "Create"} topic ${body.name} with ${body.queues} queues?`, "POST", "/api/topics", body, showTopics);
  });
}

// --------------------------------------------------------- consumer groups --

async function showGroups(selected) {
  const mine = navigation;
  const { groups } = await api("GET", "/api/groups");
  if (mine !== navigation) return;
  const rows = groups.map((g) => `<tr data-group="${esc(g.name)}"><td><a href="#groups/${encodeURIComponent(g.name)}">${esc(g.name)}</a></td>
    <td>${g.consume_enabled ? "yes" : '<span class="down">no</span>'}</td><td>${g.max_attempts || "default"}</td><td>${g.fifo ? "yes" : "no"}</td><td>${g.dead_letters}</td></tr>`).join("");
  page.innerHTML = `<section><h2>Consumer groups</h2><table><thead><tr><th>group</th><th>enabled</th><th>max attempts</th><th>FIFO</th><th>dead letters</th></tr></thead><tbody>${rows}</tbody></table>
    <form id="group-pick"><label>other group<input name="g" placeholder="group name"></label><button>show</button></form></section><div id="group"></div>`;
  $("#group-pick").addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = `#groups/${encodeURIComponent(new FormData(e.target).get("g"))}`;
  });
  if (selected) await showGroup(selected);
}

async function showGroup(name) {
  const mine = navigation;
  const g = await api("GET", `/api/groups/${encodeURIComponent(name)}`);
  if (mine !== navigation || !$("#group")) return;
  const queues = g.queues.map((q) => `<tr><td>${esc(q.topic)}</td><td>${q.queue}</td><td>${q.consumer_offset}</td><td>${q.max_offset}</td><td>${q.lag}</td><td>${q.inflight}</td><td>${q.retrying}</td></tr>`).join("");
  const members = g.members.map((m) => `<tr><td>${esc(m.client_id)}</td><td>${m.alive ? "alive" : '<span class="down">expired</span>'}</td><td>${m.last_heartbeat_ms_ago} ms ago</td><td>${m.assigned.map(esc).join(", ")}</td></tr>`).join("");
  const dlq = g.dead_letters.map((m) => `<tr><td>${m.offset}</td><td>${esc(m.message_id)}</td><td>${esc(m.topic)} #${m.origin_queue} @${m.origin_offset}</td><td>${m.delivery_attempts}</td>
    <td>${esc((m.body_text ?? m.body_hex).slice(0, 80))}</td><td class="write"><button class="resend" data-offset="${m.offset}">resend</button></td></tr>`).join("");
  const topics = [...new Set(g.queues.map((q) => q.topic))];
  const retrying = g.queues.reduce((s, q) => s + q.retrying, 0);
  $("#group").innerHTML = `<section><h2>${esc(g.name)}: total lag ${g.total_lag} · retrying ${retrying}</h2>
    <table><thead><tr><th>topic</th><th>queue</th><th>consumer offset</th><th>max offset</th><th>lag</th><th>in flight</th><th>retrying</th></tr></thead><tbody>${queues}</tbody></table>
    <form id="reset" class="write"><label>topic<select name="topic">${topics.map((t) => `<option>${esc(t)}</option>`).join("")}</select></label>
      <label>reset offset to messages stored from<input name="time" type="datetime-local" required></label><button>reset offset</button></form></section>
    <section><h2>Members</h2><table><thead><tr><th>client</th><th>state</th><th>last heartbeat</th><th>assigned queues</th></tr></thead><tbody>${members}</tbody></table></section>
    <section><h2>Dead letters (first 50)</h2><table><thead><tr><th>DLQ offset</th><th>message id</th><th>from</th><th>attempts</th><th>body</th><th class="write"></th></tr></thead><tbody>${dlq}</tbody></table></section>`;
  $("#reset").addEventListener("submit", (e) => {
    e.preventDefault();
    const d = new FormData(e.target);
    const ts = new Date(d.get("time")).getTime();
    act(`Move ${g.name}'s offsets on ${d.get("topic")} to messages stored from ${d.get("time")}?`, "POST", `/api/groups/${encodeURIComponent(g.name)}/reset-offset`, { topic: d.get("topic"), timestamp_ms: ts }, () => showGroup(name));
  });
  document.querySelectorAll("button.resend").forEach((b) =>
    b.addEventListener("click", () => act(`Resend dead letter ${b.dataset.offset} to ${g.name}?`, "POST", `/api/groups/${encodeURIComponent(g.name)}/dlq/${b.dataset.offset}/resend`, undefined, () => showGroup(name))));
}

// --------------------------------------------------------------- messages --

function messageView(m) {
  const props = Object.entries(m.properties || {}).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(", ");
  return `<section><h2>${esc(m.message_id)}</h2>
    <p>${esc(m.topic)} queue ${m.queue} offset ${m.offset} · tag ${esc(m.tag) || "-"} · keys ${esc((m.keys || []).join(", ")) || "-"}
    · stored ${new Date(m.store_timestamp_ms).toISOString()} · ${m.body_bytes} bytes
    ${m.group_state ? `· to the group: ${esc(m.group_state)}${m.delivery_attempts ? `, attempt ${m.delivery_attempts}` : ""}` : ""}</p>
    <p>properties: ${props || "-"}</p>
    <p><button class="as-text">text</button> <button class="as-hex">hex</button></p>
    <pre class="body" data-text="${esc(m.body_text ?? "(not UTF-8: shown as hex)")}" data-hex="${esc(m.body_hex)}">${esc(m.body_text ?? m.body_hex)}</pre></section>`;
}

async function showMessages() {
  page.innerHTML = `<section><h2>Find messages</h2>
      <form id="find"><label>message id<input name="id"></label><label>topic<input name="topic"></label><label>key<input name="key"></label>
        <label>delivery to group<input name="group" placeholder="(optional)"></label><button>find</button></form></section>
    <section class="write"><h2>Send a test message</h2>
      <form id="send"><label>topic<input name="topic" required></label><label>tag<input name="tag"></label><label>key<input name="key"></label>
        <label>body<input name="body" value="hello from the console"></label><button>send</button></form></section>
    <div id="found"></div>`;
  $("#find").addEventListener("submit", async (e) => {
    e.preventDefault();
    const q = new URLSearchParams(new FormData(e.target)).toString();
    try {
      const { messages } = await api("GET", `/api/messages?${q}`);
      $("#found").innerHTML = messages.length ? messages.map(messageView).join("") : "<section>nothing found</section>";
      document.querySelectorAll("pre.body").forEach((pre) => {
        const s = pre.closest("section");
        $("button.as-text", s).addEventListener("click", () => (pre.textContent = pre.dataset.text));
        $("button.as-hex", s).addEventListener("click", () => (pre.textContent = pre.dataset.hex));
      });
      banner("");
    } catch (err) {
      banner(err.message);
    }
  });
  $("#send").addEventListener("submit", (e) => {
    e.preventDefault();
    const d = Object.fromEntries(new FormData(e.target));
    act(null, "POST", "/api/messages", d, (v) => banner(`sent ${v.message_id} at offset ${v.offset}`, true));
  });
}

// ------------------------------------------------------------------ router --

async function route() {
  navigation += 1;
  clearInterval(timer);
  banner("");
  const [view, arg] = (location.hash.slice(1) || "cluster").split("/");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.id === `nav-${view}`));
  try {
    if (view === "topics") await showTopics();
    else if (view === "groups") await showGroups(arg && decodeURIComponent(arg));
    else if (view === "messages") await showMessages();
    else await showCluster();
  } catch (e) {
    banner(e.message);
  }
}

async function start() {
  try {
    mode = await api("GET", "/api/mode");
  } catch (e) {
    banner(e.message);
  }
  document.body.classList.toggle("readonly", mode.read_only);
  $("#mode").textContent = mode.read_only ? "read-only" : "";
  if (mode.needs_key && !mode.read_only) {
    const box = $("#key-box");
    box.hidden = false;
    const input = $("#admin-key");
    input.value = sessionStorage.getItem("raftmq-admin-key") || "";
    input.addEventListener("change", () => sessionStorage.setItem("raftmq-admin-key", input.value));
  }
  window.addEventListener("hashchange", route);
  await route();
}

start();
