// Number, time and id formatting for dense tables. A missing value is an em dash, never
// "0" or "NaN": an operator must tell "nothing yet" from "zero".

export const DASH = "—";

/** `01m7z9j8wh4r9fx1nwy0tg1dcq` → `wy0tg1dcq`. Stream ids are ULIDs: the first ten
 * characters are the creation time, shared by streams created in the same moments, so the
 * random tail is what tells rows apart. The full id is in the title and the stream view. */
export function shortId(id) {
  return id.length > 10 ? id.slice(-9) : id;
}

export function integer(value) {
  return value === null || value === undefined ? DASH : Math.round(value).toLocaleString("en");
}

export function rate(value) {
  return value === null || value === undefined ? DASH : Number(value).toFixed(1);
}

/** 950 → "950 ms", 1500 → "1.50 s", 61000 → "1m 01s". */
export function duration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return DASH;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 10_000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const minutes = Math.floor(ms / 60_000);
  const seconds = Math.floor((ms % 60_000) / 1000);
  if (minutes < 60) return `${minutes}m ${String(seconds).padStart(2, "0")}s`;
  return `${Math.floor(minutes / 60)}h ${String(minutes % 60).padStart(2, "0")}m`;
}

/** "4 s ago", "3 min ago", then the date. */
export function ago(iso, nowMs = Date.now()) {
  if (!iso) return DASH;
  const seconds = Math.max(0, Math.round((nowMs - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86_400) return `${Math.floor(seconds / 3600)} h ago`;
  return iso.slice(0, 10);
}

/** "14:53:31.409" in local time, with the full ISO time kept for titles. */
export function clock(iso) {
  if (!iso) return DASH;
  const date = new Date(iso);
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

export function bytes(count) {
  if (count < 1024) return `${count} B`;
  if (count < 1024 * 1024) return `${(count / 1024).toFixed(1)} kB`;
  return `${(count / 1024 / 1024).toFixed(1)} MB`;
}

export function percent(value) {
  return value === null || value === undefined ? DASH : `${Number(value).toFixed(value >= 10 ? 0 : 1)}%`;
}

/** Compact JSON for one log line; `t` is shown in its own column, so it is left out here. */
export function compactData(data) {
  if (data === null || typeof data !== "object") return String(data);
  const { t: _t, ...rest } = data;
  return JSON.stringify(rest);
}

/** A `resumed` event in words: "↻ continued by attempt 2 after event 17 (worker_stopped)". */
export function seamNote(data) {
  const { attempt, after_event_id: after, reason } = data || {};
  return `↻ continued by attempt ${attempt ?? DASH} after event ${after ?? DASH}${reason ? ` (${reason})` : ""}`;
}
