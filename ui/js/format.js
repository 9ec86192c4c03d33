// Small formatting helpers shared by the pages.

/**
 * Numbers and dates are written in the browser's conventions everywhere on the page (a review: the
 * tables wrote t0=1,000 in US style while the charts' legends wrote 0,19 in a German browser).
 */
const NUMBERS = new Intl.NumberFormat(undefined);
const DECIMAL = NUMBERS.formatToParts(1.5).find((p) => p.type === 'decimal')?.value ?? '.';
/** The locale's digits (Arabic-Indic in ar-EG: a review saw ١٬٧٠٣ beside 28٫4 written in Latin digits). */
const DIGITS = Array.from({ length: 10 }, (_, d) => NUMBERS.format(d));
const LATIN = DECIMAL === '.' && DIGITS.every((d, i) => d === String(i));

/**
 * A number's text as String/toFixed/toExponential write it ("-1.25e-7"), in the browser's digits and
 * decimal separator, without grouping. @param {string} text
 */
export function localNumber(text) {
  return LATIN ? text : text.replace(/[0-9.]/g, (c) => (c === '.' ? DECIMAL : DIGITS[Number(c)]));
}

/** @param {number | null | undefined} n */
export function fmtNum(n, digits = 4) {
  if (n === null || n === undefined || Number.isNaN(n)) return '—';
  if (Number.isInteger(n) && Math.abs(n) < 1e15) return NUMBERS.format(n);
  const a = Math.abs(n);
  // toPrecision's text, not Number(it): 1.797e308 rounded to 4 digits is past the largest double (Infinity).
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return localNumber(n.toExponential(digits - 1).replace(/\.?0+e/, 'e'));
  return localNumber(Number(n.toPrecision(digits)).toString());
}

/**
 * Labels of a time axis (seconds since the epoch) in the browser's conventions: dates when the ticks are a
 * day or more apart, else times of day (uPlot's own were US dates: 12/7/26).
 * @param {number[]} splits @param {number} incr seconds between ticks
 */
export function timeLabels(splits, incr) {
  const options = incr >= 86_400 ? { month: 'short', day: 'numeric' }
    : incr >= 60 ? { hour: '2-digit', minute: '2-digit' } : { hour: '2-digit', minute: '2-digit', second: '2-digit' };
  const format = new Intl.DateTimeFormat(undefined, /** @type {Intl.DateTimeFormatOptions} */ (options));
  return splits.map((s) => (Number.isFinite(s) ? format.format(new Date(s * 1000)) : ''));
}

/** @param {number | null | undefined} bytes */
export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${localNumber(u === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1))} ${units[u]}`;
}

/**
 * A moment as the time of day when it is today, else with its date (a session's changes span days).
 * @param {string | number | Date} when @param {Date} [now]
 */
export function fmtWhen(when, now = new Date()) {
  const d = new Date(when);
  return d.toDateString() === now.toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}

/** Time since an ISO date, as "12 s", "3 min", "2 h", "5 d". @param {string | null | undefined} iso */
export function fmtAgo(iso, now = Date.now()) {
  if (!iso) return '—';
  const s = Math.max(0, (now - Date.parse(iso)) / 1000);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

/**
 * @param {string} tag @param {Record<string, any>} [attrs]
 * @param {(Node | string | null | undefined | false)[]} children
 * @returns {HTMLElement}
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'className') el.className = v;
    else if (k === 'style') el.style.cssText = String(v); // through the CSSOM: the page's CSP refuses style attributes
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

/**
 * A table's box that scrolls sideways on a narrow screen: a tab stop with a name, so that a keyboard can
 * reach and scroll it (axe's scrollable-region-focusable; a review at 375 px).
 * @param {string} label @param {Node} child
 */
export function scrollBox(label, child) {
  return h('div', { className: 'scroll', tabindex: '0', role: 'region', 'aria-label': label }, child);
}

/** The API's rule for a session name (src/sessions/spec.ts SESSION_NAME_SOURCE). */
export const SESSION_NAME = /^(?!\.\.?$)[A-Za-z0-9._-]{1,128}$/;
export const SESSION_NAME_RULE = '1-128 characters of A-Za-z0-9._-, not "." or ".."';

/**
 * Asks for a new session's name in a modal dialog (the fork dialog of index.html), offering `offered`.
 * `submit` is called with a valid name and resolves to null when it was done (the dialog closes) or to why
 * not (shown in the dialog, which stays open to correct the name). Resolves to the name done, or null when
 * cancelled.
 * @param {string} text @param {string} offered @param {(name: string) => Promise<string | null>} submit
 * @returns {Promise<string | null>}
 */
export function nameDialog(text, offered, submit) {
  const dialog = /** @type {HTMLDialogElement} */ (document.getElementById('fork-dialog'));
  const form = /** @type {HTMLFormElement} */ (document.getElementById('fork-form'));
  const input = /** @type {HTMLInputElement} */ (document.getElementById('fork-name'));
  const error = /** @type {HTMLElement} */ (document.getElementById('fork-error'));
  const ok = /** @type {HTMLButtonElement} */ (document.getElementById('fork-ok'));
  /** @type {HTMLButtonElement} */ (document.getElementById('fork-cancel')).onclick = () => dialog.close();
  /** @type {HTMLElement} */ (document.getElementById('fork-text')).textContent = text;
  /** @type {HTMLElement} */ (document.getElementById('fork-rule')).textContent = `A session name is ${SESSION_NAME_RULE}.`;
  input.value = offered;
  error.textContent = '';
  input.removeAttribute('aria-invalid');
  dialog.showModal();
  input.focus();
  input.select();
  return new Promise((resolve) => {
    let done = /** @type {string | null} */ (null);
    const onInput = () => {
      error.textContent = '';
      input.removeAttribute('aria-invalid');
    };
    /** @param {SubmitEvent} event */
    const onSubmit = async (event) => {
      event.preventDefault();
      if (ok.disabled) return;
      const name = input.value.trim();
      if (!SESSION_NAME.test(name)) {
        error.textContent = `Not a session name: a name is ${SESSION_NAME_RULE}.`;
        input.setAttribute('aria-invalid', 'true');
        input.focus();
        return;
      }
      ok.disabled = true;
      error.textContent = '…';
      try {
        const why = await submit(name);
        if (why === null) {
          done = name;
          dialog.close();
        } else {
          error.textContent = why;
          input.setAttribute('aria-invalid', 'true');
          input.focus();
        }
      } finally {
        ok.disabled = false;
      }
    };
    input.addEventListener('input', onInput);
    form.addEventListener('submit', onSubmit);
    dialog.addEventListener('close', () => {
      input.removeEventListener('input', onInput);
      form.removeEventListener('submit', onSubmit);
      resolve(done);
    }, { once: true });
  });
}

/** Asks for a confirmation in a modal dialog. @param {string} text @returns {Promise<boolean>} */
export function confirmDialog(text) {
  const dialog = /** @type {HTMLDialogElement} */ (document.getElementById('confirm-dialog'));
  /** @type {HTMLElement} */ (document.getElementById('confirm-text')).textContent = text;
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true }));
}

/**
 * Rebuilds part of a page and keeps the keyboard focus: when the focus was on an element inside `container`
 * (a link, a button), it goes to the element at the same place after the rebuild: in the element with the
 * same `keyAttr` value (a session's name, a snapshot's id), the focusable one with the same index. When that
 * element is gone (a snapshot pruned while its Pin had the focus, a session deleted), the element now at its
 * place takes the focus, or the last one, or with none left the scroll region round the container: the focus
 * is not dropped to the page's start (a review: a keyboard user reading the snapshots of a training session
 * was sent back to the top every few seconds).
 * @param {HTMLElement} container @param {string} keyAttr @param {() => void} rebuild
 */
export function keepFocus(container, keyAttr, rebuild) {
  const active = document.activeElement;
  const keyed = active && active !== container && container.contains(active) ? active.closest(`[${keyAttr}]`) : null;
  const key = keyed?.getAttribute(keyAttr) ?? null;
  const focusable = 'a[href], button:not([disabled]), input, select, textarea, [tabindex]';
  const focusablesOf = (/** @type {Element} */ el) => [...el.querySelectorAll(focusable), ...(el.matches(focusable) ? [el] : [])];
  const index = keyed ? focusablesOf(keyed).indexOf(/** @type {Element} */ (active)) : -1;
  const place = keyed ? [...container.querySelectorAll(`[${keyAttr}]`)].indexOf(keyed) : -1;
  rebuild();
  if (key === null || index < 0) return;
  const now = [...container.querySelectorAll(`[${keyAttr}]`)];
  const again = now.find((el) => el.getAttribute(keyAttr) === key) ?? now[Math.min(place, now.length - 1)];
  const targets = again ? focusablesOf(again) : [];
  const target = targets[Math.min(index, targets.length - 1)] ?? container.closest('[tabindex]');
  /** @type {HTMLElement | null | undefined} */ (target)?.focus({ preventScroll: true });
}

/**
 * The open round of a session with aggregation: "2 of 3 · 4 s" (contributions of the count it steps at, and
 * its age), or "waiting" with none yet; "—" for a session without rounds.
 * @param {any} s
 */
export function roundCell(s) {
  if (!s.aggregation) return '—';
  if (!s.round || s.round.contributions === 0) return 'waiting';
  const of = s.aggregation.contributions ? ` of ${s.aggregation.contributions}` : '';
  return `${s.round.contributions}${of} · ${fmtAgo(new Date(Date.now() - s.round.age_s * 1000).toISOString())}`;
}

/**
 * What a session's rounds are set to and who is in the open one, shown under the round's card: "steps at 3
 * contributions or 30 s (at least 2) · contributed: w0, w1 (96 samples)".
 * @param {any} s @param {number} [most] the workers named at most
 */
export function roundTitle(s, most = 12) {
  const a = s.aggregation;
  if (!a) return '';
  const at = [a.contributions ? `${a.contributions} contributions` : null, a.target_samples ? `${a.target_samples} samples` : null].filter(Boolean).join(' or ');
  const timeout = a.timeout_s ? ` or ${a.timeout_s} s${a.min_contributions ? ` (at least ${a.min_contributions})` : ''}` : '';
  /** @type {string[]} */
  const names = s.round?.workers ?? [];
  // A round of up to 1,024 workers: the first names (by name) and how many more.
  const listed = names.length > most ? `${names.slice(0, most).join(', ')} and ${names.length - most} more` : names.join(', ');
  const workers = names.length ? ` · contributed: ${listed}${s.round.samples !== null && s.round.samples !== undefined ? ` (${s.round.samples} samples)` : ''}` : ' · no contribution yet';
  return `a round steps at ${at}${timeout}${workers}`;
}
