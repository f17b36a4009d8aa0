/* M365 Usage Dashboard page: plain ES2020, no dependencies, only the public API (relative URLs).
 *
 * Served under a strict CSP (script-src 'self', style-src 'self'): no inline scripts or styles,
 * no element.style; presentation changes go through classes, `hidden` and data attributes.
 * Every value that comes from the API is inserted with textContent, never as HTML.
 */
"use strict";

(() => {
  const API = {
    summary: "api/m365/summary",
    users: (name) => `api/m365/users?${new URLSearchParams({ org: name })}`,
    csv: "api/m365/export?format=csv",
    history: "api/m365/history",
    changes: "api/m365/changes",
    orgHistory: (name) => `api/m365/history?${new URLSearchParams({ org: name })}`,
    changesSince: (since, name, format) => `api/m365/changes?${new URLSearchParams({
      since, ...(name ? { org: name } : {}), ...(format ? { format } : {}) })}`,
    coverage: (name, format) => `api/m365/coverage?${new URLSearchParams({
      ...(name === undefined ? {} : { org: name }), ...(format ? { format } : {}) })}`,
    billing: (month, name, format) => `api/m365/billing?${new URLSearchParams({
      month, ...(name === undefined ? {} : { org: name }), ...(format ? { format } : {}) })}`,
    billingItems: (month, format) => `api/m365/billing/items?${new URLSearchParams({
      month, ...(format ? { format } : {}) })}`,
  };
  const STALE_AFTER_MS = 24 * 60 * 60 * 1000;
  const REQUEST_TIMEOUT_MS = 20000;
  const NAME_KEY = "organization_name";

  const $ = (id) => document.getElementById(id);
  const el = {
    loading: $("state-loading"), empty: $("state-empty"), error: $("state-error"), content: $("content"),
    errorDetail: $("error-detail"), errorRetry: $("error-retry"), emptyRetry: $("empty-retry"),
    freshness: $("freshness"), lastCollected: $("last-collected"), freshnessAge: $("freshness-age"),
    staleBanner: $("stale-banner"), staleText: $("stale-text"), exportCsv: $("export-csv"),
    kpiOrgs: $("kpi-orgs"), kpiEs: $("kpi-es"), kpiM365: $("kpi-m365"), kpiEsShare: $("kpi-es-share"),
    orgSearch: $("org-search"), orgCount: $("org-count"), orgTable: $("org-table"), orgRows: $("org-rows"),
    totalOrgs: $("total-orgs"), totalEs: $("total-es"), totalM365: $("total-m365"),
    main: $("main"), dialog: $("users-dialog"), usersTitle: $("users-title"), usersCount: $("users-count"),
    usersClose: $("users-close"), userSearch: $("user-search"), usersLoading: $("users-loading"),
    usersError: $("users-error"), usersErrorText: $("users-error-text"), usersRetry: $("users-retry"),
    usersEmpty: $("users-empty"), usersTable: $("users-table"), userRows: $("user-rows"),
    deltaHeading: $("delta-heading"), totalDelta: $("total-delta"),
    coverageHead: $("coverage-head"), totalCoverage: $("total-coverage"), coverageNote: $("coverage-note"),
    coverageCsv: $("coverage-csv"), usersBackupHead: $("users-backup-head"), unbilled: $("unbilled"),
    unbilledList: $("unbilled-list"),
    trend: $("trend"), trendNote: $("trend-note"), trendChart: $("trend-chart"), trendLegend: $("trend-legend"),
    trendCaption: $("trend-caption"), trendRows: $("trend-rows"),
    changes: $("changes"), changesSince: $("changes-since"), changesNights: $("changes-nights"),
    changesOrg: $("changes-org"), changesCsv: $("changes-csv"), changesSummary: $("changes-summary"),
    changesLoading: $("changes-loading"), changesMessage: $("changes-message"),
    changesMessageText: $("changes-message-text"), changesTable: $("changes-table"), changesRows: $("changes-rows"),
    backupLegend: $("backup-legend"), downloadError: $("download-error"),
    tabUsage: $("tab-usage"), tabBilling: $("tab-billing"), viewUsage: $("view-usage"), viewBilling: $("view-billing"),
    billingMonth: $("billing-month"), billingBasis: $("billing-basis"), billingSearch: $("billing-search"),
    billingCount: $("billing-count"), billingStatus: $("billing-status"), billingState: $("billing-state"),
    billingCsv: $("billing-csv"), billingItemsCsv: $("billing-items-csv"), billingLoading: $("billing-loading"),
    billingMessage: $("billing-message"), billingMessageText: $("billing-message-text"),
    billingTable: $("billing-table"), billingRows: $("billing-rows"), billingTotalOrgs: $("billing-total-orgs"),
    billingTotalEs: $("billing-total-es"), billingTotalM365: $("billing-total-m365"),
    billingTotalBackup: $("billing-total-backup"),
    billingDialog: $("billing-dialog"), billingOrgMonth: $("billing-org-month"), billingOrgTitle: $("billing-org-title"),
    billingOrgMeta: $("billing-org-meta"), billingOrgClose: $("billing-org-close"), billingOrgCsv: $("billing-org-csv"),
    billingOrgLoading: $("billing-org-loading"), billingOrgMessage: $("billing-org-message"),
    billingOrgMessageText: $("billing-org-message-text"), billingOrgTable: $("billing-org-table"),
    billingOrgCaption: $("billing-org-caption"), billingOrgRows: $("billing-org-rows"),
  };

  const numberFormat = new Intl.NumberFormat();
  const percentFormat = new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 0 });
  const dateFormat = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "numeric", minute: "2-digit", timeZoneName: "short",
  });
  const relativeFormat = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const fmt = (n) => numberFormat.format(Number(n) || 0);
  /** "1 organization", "2 organizations": every count the page writes goes through here. */
  const plural = (n, one, many) => `${fmt(n)} ${Number(n) === 1 ? one : many}`;

  const state = {
    organizations: [], // [{org, row, button, lowerName}]
    totals: null,
    lastCollected: null,
    sortKey: NAME_KEY,
    sortDir: "ascending",
    nightsLoaded: Promise.resolve([]), // the kept nights (loadNights), shared by the views that need them
  };

  // -- helpers ----------------------------------------------------------------------------

  /** Compare by Unicode code point (JS `<` compares UTF-16 code units, which differs above U+FFFF). */
  function compareCodePoints(a, b) {
    const n = Math.min(a.length, b.length);
    for (let i = 0; i < n; i += 1) {
      const x = a.charCodeAt(i);
      const y = b.charCodeAt(i);
      if (x !== y) {
        const xAstral = x >= 0xd800 && x <= 0xdfff;
        const yAstral = y >= 0xd800 && y <= 0xdfff;
        if (xAstral !== yAstral) return xAstral ? 1 : -1;
        return x < y ? -1 : 1;
      }
    }
    return a.length - b.length;
  }

  /** The product's name order (docs/RULES.md, rule 9): lower-cased first, then exact, by code point.
   * It is the order the API and the CSV export use, so the table and the export always agree. */
  function compareNames(a, b) {
    return compareCodePoints(a.toLowerCase(), b.toLowerCase()) || compareCodePoints(a, b);
  }

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  async function fetchJson(url, signal) {
    const timeout = new AbortController();
    const timer = setTimeout(() => timeout.abort(), REQUEST_TIMEOUT_MS);
    const onAbort = () => timeout.abort();
    if (signal) signal.addEventListener("abort", onAbort, { once: true });
    try {
      let response;
      try {
        response = await fetch(url, { headers: { Accept: "application/json" }, signal: timeout.signal });
      } catch (err) {
        if (signal && signal.aborted) throw err;
        const reason = timeout.signal.aborted ? "the request timed out" : "the server did not answer";
        throw Object.assign(new Error(`Network error: ${reason}.`), { kind: "network" });
      }
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      if (!response.ok) {
        const message = body && typeof body.error === "string" ? body.error : response.statusText;
        throw Object.assign(new Error(`HTTP ${response.status}: ${message}`),
          { kind: "http", status: response.status, detail: message });
      }
      if (!body || body.status !== "success") {
        throw Object.assign(new Error("The API answered with an unexpected response."), { kind: "format" });
      }
      return { body, headers: response.headers };
    } finally {
      clearTimeout(timer);
      if (signal) signal.removeEventListener("abort", onAbort);
    }
  }

  // -- page states ------------------------------------------------------------------------

  function showState(name) {
    el.loading.hidden = name !== "loading";
    el.empty.hidden = name !== "empty";
    el.error.hidden = name !== "error";
    el.content.hidden = name !== "content";
    const hasData = name === "content";
    el.freshness.hidden = !hasData;
    el.exportCsv.hidden = !hasData;
    if (!hasData) el.staleBanner.hidden = true;
  }

  let summaryController = null;

  async function loadSummary(event) {
    const viewerAsked = Boolean(event && event.type === "click");
    if (summaryController) summaryController.abort();
    const controller = new AbortController();
    summaryController = controller;
    showState("loading");
    try {
      const { body, headers } = await fetchJson(API.summary, controller.signal);
      if (!Array.isArray(body.organizations)) {
        throw Object.assign(new Error("The summary has no organization list."), { kind: "format" });
      }
      renderSummary(body, headers);
      const nights = loadNights(controller.signal);
      state.nightsLoaded = nights;
      resetBilling();
      loadDeltas(controller.signal, nights);
      initChanges(controller.signal, nights);
      showState("content");
      updateFreshness();
      loadCoverage();
      if (viewerAsked) el.main.focus({ preventScroll: true });
    } catch (err) {
      if (controller.signal.aborted) return;
      if (err.kind === "http" && err.status === 404) {
        showState("empty");
        if (viewerAsked) el.emptyRetry.focus({ preventScroll: true });
      } else {
        el.errorDetail.textContent = err.message || String(err);
        showState("error");
        if (viewerAsked) el.errorRetry.focus({ preventScroll: true });
      }
    } finally {
      if (summaryController === controller) summaryController = null;
    }
  }

  // -- summary table ----------------------------------------------------------------------

  function renderSummary(body, headers) {
    const organizations = body.organizations;
    const totals = body.totals || {};
    state.totals = {
      organizations: totals.total_organizations ?? organizations.length,
      es: totals.total_es_users ?? organizations.reduce((s, o) => s + (Number(o.es_user_count) || 0), 0),
      m365: totals.total_m365_licensed_users
        ?? organizations.reduce((s, o) => s + (Number(o.m365_licensed_user_count) || 0), 0),
    };
    state.lastCollected = typeof body.last_collected === "string" ? body.last_collected : null;

    state.organizations = organizations.map((org, index) => {
      const row = make("tr");
      row.dataset.index = String(index);
      const nameCell = make("th", "col-name");
      nameCell.scope = "row";
      const button = make("button", "org-link", String(org.organization_name));
      button.type = "button";
      button.dataset.index = String(index);
      nameCell.append(button);
      const edges = whitespaceEdges(String(org.organization_name));
      if (edges) {
        // Names are exact: 'Acme' and 'Acme ' are two organizations; make the difference visible.
        const note = make("span", "name-note", edges);
        note.title = "The organization name has this whitespace exactly as the vendor gave it";
        nameCell.append(note);
      }
      const es = Number(org.es_user_count) || 0;
      const m365 = Number(org.m365_licensed_user_count) || 0;
      const esCell = make("td", es === 0 ? "num is-zero" : "num", fmt(es));
      const m365Cell = make("td", m365 === 0 ? "num is-zero" : "num", fmt(m365));
      row.append(nameCell, esCell, m365Cell);
      return { org, row, button, lowerName: String(org.organization_name).toLowerCase() };
    });

    el.kpiOrgs.textContent = fmt(state.totals.organizations);
    el.kpiEs.textContent = fmt(state.totals.es);
    el.kpiM365.textContent = fmt(state.totals.m365);
    el.kpiEsShare.textContent = state.totals.m365 > 0
      ? `${percentFormat.format(state.totals.es / state.totals.m365)} of licensed users` : "";

    el.exportCsv.href = API.csv;
    el.exportCsv.download = `m365-users-${exportDate(headers)}.csv`;
    applyOrder();
  }

  function whitespaceEdges(name) {
    const leading = /^\s/u.test(name);
    const trailing = /\s$/u.test(name);
    if (leading && trailing) return "leading and trailing space";
    if (leading) return "leading space";
    return trailing ? "trailing space" : "";
  }

  /** The date in the server's download name (the day the data was published), else today. */
  function exportDate(headers) {
    const published = new Date(headers.get("Last-Modified") || state.lastCollected || Date.now());
    const day = Number.isNaN(published.getTime()) ? new Date() : published;
    return day.toISOString().slice(0, 10);
  }

  function sortedOrganizations() {
    const key = state.sortKey;
    const direction = state.sortDir === "ascending" ? 1 : -1;
    const byName = (a, b) => compareNames(a.org[NAME_KEY], b.org[NAME_KEY]);
    return [...state.organizations].sort((a, b) => {
      if (key === NAME_KEY) return direction * byName(a, b);
      const difference = (Number(a.org[key]) || 0) - (Number(b.org[key]) || 0);
      return direction * difference || byName(a, b); // ties: by name, A to Z
    });
  }

  function applyOrder() {
    const query = el.orgSearch.value;
    const needle = query.trim() ? query.toLowerCase() : "";
    const fragment = document.createDocumentFragment();
    let shown = 0;
    for (const item of sortedOrganizations()) {
      item.row.hidden = needle !== "" && !item.lowerName.includes(needle);
      if (!item.row.hidden) shown += 1;
      fragment.append(item.row);
    }
    if (shown === 0) {
      const row = make("tr", "no-match");
      const cell = make("td", "", state.organizations.length === 0
        ? "No organizations have been published."
        : `No organizations match “${query.trim()}”.`);
      cell.colSpan = el.orgTable.tHead.rows[0].cells.length;
      row.append(cell);
      fragment.append(row);
    }
    el.orgRows.replaceChildren(fragment);
    el.orgCount.textContent = `${fmt(shown)} of ${plural(state.organizations.length, "organization",
      "organizations")}`;
    renderTotals(needle === "" ? null : state.organizations.filter((item) => !item.row.hidden));
    for (const th of el.orgTable.tHead.querySelectorAll("th[data-key]")) {
      th.setAttribute("aria-sort", th.dataset.key === state.sortKey ? state.sortDir : "none");
    }
  }

  /** The Total row sums what is shown, in every column: the API's totals unfiltered, else the sums of the
   * matching organizations' rows (their deltas and backup coverage included). */
  function renderTotals(matching) {
    if (!state.totals) return;
    const sum = (key) => matching.reduce((s, item) => s + (Number(item.org[key]) || 0), 0);
    el.totalOrgs.textContent = matching
      ? `of ${plural(matching.length, "shown organization", "shown organizations")}`
      : plural(state.totals.organizations, "organization", "organizations");
    el.totalEs.textContent = fmt(matching ? sum("es_user_count") : state.totals.es);
    el.totalM365.textContent = fmt(matching ? sum("m365_licensed_user_count") : state.totals.m365);
    renderDeltaTotal(matching);
    renderCoverageTotal(matching);
  }

  function onSortClick(event) {
    const button = event.target.closest("button.sort");
    if (!button) return;
    const key = button.closest("th").dataset.key;
    if (key === state.sortKey) {
      state.sortDir = state.sortDir === "ascending" ? "descending" : "ascending";
    } else {
      state.sortKey = key;
      state.sortDir = key === NAME_KEY ? "ascending" : "descending"; // counts: largest first
    }
    applyOrder();
  }

  // -- nights: change since the previous night (docs/RULES.md, rules 11 and 12) -------------

  /** Per organization, licensed users that arrived (added, moved in) and left (removed, moved out). */
  function deltasOf(changes) {
    const deltas = new Map();
    const bump = (name, key) => {
      if (typeof name !== "string") return;
      const entry = deltas.get(name) || { in: 0, out: 0 };
      entry[key] += 1;
      deltas.set(name, entry);
    };
    for (const change of changes) {
      if (change.change === "added" || change.change === "moved") bump(change.organization_name, "in");
      if (change.change === "removed") bump(change.organization_name, "out");
      if (change.change === "moved") bump(change.previous_organization_name, "out");
    }
    return deltas;
  }

  function deltaText(entry) {
    return `+${fmt(entry.in)} / \u2212${fmt(entry.out)}`;
  }

  function deltaCell(entry, since) {
    const cell = make("td", "num col-delta", deltaText(entry));
    if (entry.in === 0 && entry.out === 0) cell.classList.add("is-zero");
    cell.title = `${fmt(entry.in)} added or moved in, ${fmt(entry.out)} removed or moved out since ${since}`;
    return cell;
  }

  /** The kept nights, oldest first ([{date, es_user_count, m365_licensed_user_count}]); rejects when unknown. */
  async function loadNights(signal) {
    const { body } = await fetchJson(API.history, signal);
    return Array.isArray(body.history) ? body.history.filter((n) => typeof n.date === "string") : [];
  }

  const deltaView = { changes: null, deltas: null, since: "" };
  const ZERO_DELTA = Object.freeze({ in: 0, out: 0 });

  /** The delta column appears only when an earlier night is kept to compare tonight with. */
  async function loadDeltas(signal, nightsLoaded) {
    deltaView.changes = null;
    try {
      const nights = await nightsLoaded;
      if (nights.length < 2) return;
      const { body } = await fetchJson(API.changes, signal);
      const changes = Array.isArray(body.changes) ? body.changes : [];
      deltaView.changes = changes;
      deltaView.since = nights[nights.length - 2].date;
      deltaView.deltas = deltasOf(changes);
      for (const item of state.organizations) {
        item.row.querySelector(".col-delta")?.remove();
        // Before the coverage cell when that loaded first: the columns follow the header's order.
        item.row.insertBefore(deltaCell(deltaOf(item), deltaView.since), item.row.querySelector(".coverage-cell"));
      }
      el.deltaHeading.hidden = false;
      el.totalDelta.hidden = false;
      renderDeltaTotal(currentMatches());
    } catch (_) {
      // The counts stand without the delta column; nothing to tell the viewer beyond its absence.
    }
  }

  function deltaOf(item) {
    return deltaView.deltas.get(String(item.org[NAME_KEY])) || ZERO_DELTA;
  }

  /** The organizations the search shows, or null when nothing is searched (the whole population). */
  function currentMatches() {
    const needle = el.orgSearch.value.trim() ? el.orgSearch.value.toLowerCase() : "";
    return needle === "" ? null : state.organizations.filter((item) => !item.row.hidden);
  }

  /** Unfiltered: everyone added and removed since the previous night, customers that left included (a move
   * between two organizations changes no total). Under a search: the sum of the shown rows. */
  function renderDeltaTotal(matching) {
    const changes = deltaView.changes;
    if (!changes) return;
    const since = deltaView.since;
    if (matching) {
      const total = matching.reduce((s, item) => ({ in: s.in + deltaOf(item).in, out: s.out + deltaOf(item).out }),
        { in: 0, out: 0 });
      el.totalDelta.textContent = deltaText(total);
      el.totalDelta.title = `The shown organizations' rows added up: ${fmt(total.in)} added or moved in, `
        + `${fmt(total.out)} removed or moved out since ${since}`;
      return;
    }
    const totalIn = changes.filter((c) => c.change === "added").length;
    const totalOut = changes.filter((c) => c.change === "removed").length;
    const moved = changes.filter((c) => c.change === "moved").length;
    el.totalDelta.textContent = deltaText({ in: totalIn, out: totalOut });
    el.totalDelta.title = `${fmt(totalIn)} added, ${fmt(totalOut)} removed since ${since}`
      + ` (${plural(moved, "user", "users")} moved between organizations)`;
  }

  // -- freshness --------------------------------------------------------------------------

  function relativeAge(ms) {
    const steps = [["day", 86400000], ["hour", 3600000], ["minute", 60000]];
    for (const [unit, size] of steps) {
      if (ms >= size) return relativeFormat.format(-Math.floor(ms / size), unit);
    }
    return "just now";
  }

  function updateFreshness() {
    const iso = state.lastCollected;
    const when = iso ? new Date(iso) : null;
    if (!when || Number.isNaN(when.getTime())) {
      el.lastCollected.removeAttribute("datetime");
      el.lastCollected.textContent = "an unknown time";
      el.freshnessAge.textContent = "";
      el.freshness.classList.remove("is-stale");
      el.staleBanner.hidden = true;
      return;
    }
    const age = Math.max(0, Date.now() - when.getTime());
    const stale = age > STALE_AFTER_MS;
    const formatted = dateFormat.format(when);
    el.lastCollected.dateTime = iso;
    el.lastCollected.textContent = formatted;
    el.lastCollected.title = `${iso} (UTC)`;
    el.freshnessAge.textContent = relativeAge(age);
    el.freshness.classList.toggle("is-stale", stale);
    el.staleText.textContent = ` It was collected ${relativeAge(age)} (${formatted}). The pipeline collects `
      + "every night at 23:00; check the latest nightly_refresh run in Dagster.";
    if (el.staleBanner.hidden === stale) el.staleBanner.hidden = !stale;
  }

  // -- drill-down dialog ------------------------------------------------------------------

  const drill = { item: null, opener: null, users: [], controller: null };

  function showUsersState(name) {
    el.usersLoading.hidden = name !== "loading";
    el.usersError.hidden = name !== "error";
    el.usersEmpty.hidden = name !== "empty";
    el.usersTable.hidden = name !== "table";
    el.dialog.setAttribute("aria-busy", String(name === "loading"));
  }

  function openUsers(item, opener) {
    drill.item = item;
    drill.opener = opener;
    drill.users = [];
    el.usersTitle.textContent = String(item.org[NAME_KEY]);
    el.userSearch.value = "";
    el.userRows.replaceChildren();
    el.usersCount.textContent = "";
    if (!el.dialog.open) el.dialog.showModal();
    el.userSearch.focus();
    loadUsers();
    loadUserCoverage(String(item.org[NAME_KEY]));
    loadTrend(String(item.org[NAME_KEY]));
  }

  async function loadUsers() {
    if (drill.controller) drill.controller.abort();
    const controller = new AbortController();
    drill.controller = controller;
    const name = String(drill.item.org[NAME_KEY]);
    showUsersState("loading");
    el.usersCount.textContent = "Loading…";
    try {
      const { body } = await fetchJson(API.users(name), controller.signal);
      drill.users = Array.isArray(body.users) ? body.users : [];
      renderUsers();
    } catch (err) {
      if (controller.signal.aborted) return;
      el.usersErrorText.textContent = err.kind === "http" && err.status === 404
        ? "This organization is no longer in the published data. Reload the page to see the latest summary."
        : `Could not load the users. ${err.message || err}`;
      el.usersCount.textContent = "";
      showUsersState("error");
    } finally {
      if (drill.controller === controller) drill.controller = null;
    }
  }

  function userRow(user) {
    const row = make("tr");
    const esLicensed = user.has_email_license === true;
    const licenses = String(user.licenses ?? "");
    const name = make("td", "user-name", String(user.display_name ?? ""));
    name.dataset.label = "Display name";
    const upn = make("td", "user-upn", String(user.user_principal_name ?? ""));
    upn.dataset.label = "UPN";
    const lic = make("td", licenses ? "user-licenses" : "user-licenses is-empty", licenses || "—");
    lic.dataset.label = "Licenses";
    if (!licenses) {
      // Rule 6: a published user with no license names is one source S does not know; the backup's
      // licensed mailbox stands in, for the email flag too.
      lic.append(make("span", "user-licenses__why", BACKUP_ONLY_NOTE));
    }
    const email = make("td", "center user-es");
    email.dataset.label = "Email";
    if (esLicensed) {
      const badge = make("span", "badge badge--es", "ES");
      badge.title = "Has an email (Exchange mailbox) license";
      email.append(badge, make("span", "visually-hidden", " email license"));
    } else {
      email.append(make("span", "no-badge", "—"), make("span", "visually-hidden", "no email license"));
      email.firstChild.setAttribute("aria-hidden", "true");
    }
    row.append(name, upn, lic, email);
    if (drillCoverage.byUpn) row.append(backupCell(drillCoverage.byUpn.get(String(user.user_principal_name))));
    return row;
  }

  const BACKUP_ONLY_NOTE = "Known only from the backup: the SaaS source does not list this user, so there are no "
    + "license names; the backup's licensed mailbox counts instead (with the ES badge, as an email user).";

  function renderUsers() {
    const all = drill.users;
    const query = el.userSearch.value;
    const needle = query.trim() ? query.toLowerCase() : "";
    const matches = needle === "" ? all : all.filter((u) => [u.user_principal_name, u.display_name, u.licenses]
      .some((v) => String(v ?? "").toLowerCase().includes(needle)));
    const esCount = all.filter((u) => u.has_email_license === true).length;
    el.userSearch.closest(".search").hidden = all.length === 0; // nothing to search in
    if (all.length === 0) {
      el.usersCount.textContent = "0 users";
      el.userRows.replaceChildren();
      showUsersState("empty");
      return;
    }
    const shown = needle === "" ? plural(all.length, "user", "users")
      : `${fmt(matches.length)} of ${plural(all.length, "user", "users")}`;
    el.usersCount.textContent = `${shown} · ${fmt(esCount)} with an email (ES) license`;
    const fragment = document.createDocumentFragment();
    for (const user of matches) fragment.append(userRow(user));
    if (matches.length === 0) {
      const row = make("tr", "no-match");
      const cell = make("td", "", `No users match “${query.trim()}”.`);
      cell.colSpan = drillCoverage.byUpn ? 5 : 4;
      row.append(cell);
      fragment.append(row);
    }
    el.userRows.replaceChildren(fragment);
    showUsersState("table");
  }

  function onDialogClose() {
    if (drill.controller) drill.controller.abort();
    if (drillCoverage.controller) drillCoverage.controller.abort();
    if (trend.controller) trend.controller.abort();
    const opener = drill.opener;
    drill.item = null;
    drill.opener = null;
    if (opener && opener.isConnected) opener.focus();
  }

  function onDialogClick(event) {
    if (event.target !== el.dialog) return; // only a click on the backdrop itself
    const box = el.dialog.getBoundingClientRect();
    const inside = event.clientX >= box.left && event.clientX <= box.right
      && event.clientY >= box.top && event.clientY <= box.bottom;
    if (!inside) el.dialog.close();
  }

  // -- backup coverage (docs/RULES.md, rule 13) ------------------------------------------------
  // Optional: when source B is not configured the API answers 404 and the page shows no coverage.

  const coverage = { byName: null, totals: null, controller: null };
  const drillCoverage = { rows: null, byUpn: null, controller: null };
  const BACKUP_LABELS = {
    active: "Backed up", excluded: "Excluded", available: "Not added", none: "Not in backup",
  };

  async function loadCoverage() {
    if (coverage.controller) coverage.controller.abort();
    const controller = new AbortController();
    coverage.controller = controller;
    coverage.byName = null;
    let totals = null;
    try {
      const { body } = await fetchJson(API.coverage(), controller.signal);
      if (Array.isArray(body.organizations)) {
        coverage.byName = new Map(body.organizations.map((o) => [String(o.organization_name), o]));
        totals = body.totals || {};
      }
    } catch (_) {
      if (controller.signal.aborted) return;
    } finally {
      if (coverage.controller === controller) coverage.controller = null;
    }
    renderCoverageColumn(totals);
  }

  /** "41 of 45 protected": email users backed up of email users, marked when some are not. */
  function fillCoverage(node, counts, prefix = "") {
    const es = Number(counts.es) || 0;
    const backedUp = Number(counts.backedUp) || 0;
    const missing = Number(counts.missing) || 0;
    const unbilled = Number(counts.unbilled) || 0;
    if (es === 0) {
      node.textContent = `${prefix}No email users`;
    } else {
      node.textContent = `${prefix}${fmt(backedUp)} of ${fmt(es)} protected`;
    }
    node.classList.toggle("is-zero", es === 0);
    node.classList.toggle("is-short", missing > 0);
    const notes = [];
    if (missing > 0) notes.push(`${fmt(missing)} email ${missing === 1 ? "user is" : "users are"} not backed up`);
    if (unbilled > 0) {
      notes.push(`${fmt(unbilled)} backed-up ${unbilled === 1 ? "mailbox has" : "mailboxes have"} no email license`);
    }
    node.title = notes.join("; ");
    return node;
  }

  function organizationCounts(o) {
    return { es: o.es_user_count, backedUp: o.es_users_backed_up, missing: o.es_users_not_backed_up,
      unbilled: o.backed_up_without_email_license };
  }

  function renderCoverageColumn(totals) {
    const show = coverage.byName !== null;
    el.coverageHead.hidden = !show;
    el.totalCoverage.hidden = !show;
    for (const item of state.organizations) {
      const old = item.row.querySelector(".coverage-cell");
      if (old) old.remove();
      const entry = show ? coverage.byName.get(String(item.org[NAME_KEY])) : undefined;
      if (show) item.row.append(entry ? fillCoverage(make("td", "num coverage-cell"), organizationCounts(entry))
        : make("td", "num coverage-cell is-zero", "—"));
    }
    coverage.totals = show ? totals : null;
    renderCoverageTotal(currentMatches());
  }

  /** The coverage total: the API's totals unfiltered, else the shown organizations' counts added up. */
  function renderCoverageTotal(matching) {
    if (!coverage.byName || !coverage.totals) return;
    const totals = coverage.totals;
    let counts = { es: totals.total_es_users, backedUp: totals.total_es_users_backed_up,
      missing: totals.total_es_users_not_backed_up, unbilled: totals.total_backed_up_without_email_license };
    if (matching) {
      counts = { es: 0, backedUp: 0, missing: 0, unbilled: 0 };
      for (const item of matching) {
        const entry = coverage.byName.get(String(item.org[NAME_KEY]));
        if (!entry) continue;
        for (const [key, value] of Object.entries(organizationCounts(entry))) counts[key] += Number(value) || 0;
      }
    }
    fillCoverage(el.totalCoverage, counts);
  }

  async function loadUserCoverage(name) {
    if (drillCoverage.controller) drillCoverage.controller.abort();
    drillCoverage.rows = null;
    drillCoverage.byUpn = null;
    const entry = coverage.byName ? coverage.byName.get(name) : undefined;
    renderUserCoverage(entry);
    if (!entry) return;
    const controller = new AbortController();
    drillCoverage.controller = controller;
    try {
      const { body } = await fetchJson(API.coverage(name), controller.signal);
      drillCoverage.rows = Array.isArray(body.users) ? body.users : [];
      drillCoverage.byUpn = new Map(drillCoverage.rows.map((r) => [String(r.user_principal_name), r]));
    } catch (_) {
      if (controller.signal.aborted) return;
    } finally {
      if (drillCoverage.controller === controller) drillCoverage.controller = null;
    }
    renderUserCoverage(entry);
    if (!el.usersTable.hidden) renderUsers();
  }

  function renderUserCoverage(entry) {
    el.coverageNote.hidden = !entry;
    el.coverageCsv.hidden = !entry;
    if (entry) {
      fillCoverage(el.coverageNote, organizationCounts(entry), "Backup: ");
      el.coverageCsv.href = API.coverage(String(entry.organization_name), "csv");
    }
    el.usersBackupHead.hidden = !drillCoverage.byUpn;
    el.backupLegend.hidden = !drillCoverage.byUpn;
    el.unbilled.hidden = !drillCoverage.rows;
    if (!drillCoverage.rows) return;
    const unbilled = drillCoverage.rows.filter((r) => r.backup_status === "active" && r.has_email_license !== true);
    const items = unbilled.map((r) => {
      const li = make("li", "unbilled__item");
      li.append(make("span", "unbilled__name", String(r.display_name ?? "")),
        make("span", "user-upn unbilled__upn", String(r.user_principal_name ?? "")),
        make("span", "unbilled__why", r.m365_licensed === true ? "M365 license without email"
          : "no M365 license in this organization"));
      return li;
    });
    if (items.length === 0) {
      items.push(make("li", "unbilled__none", "None: every backed-up mailbox has an email license."));
    }
    el.unbilledList.replaceChildren(...items);
  }

  function backupCell(entry) {
    const known = entry && Object.prototype.hasOwnProperty.call(BACKUP_LABELS, entry.backup_status);
    const status = known ? entry.backup_status : "none";
    const cell = make("td", "user-backup");
    cell.dataset.label = "Backup";
    const badge = make("span", `badge badge--backup badge--${status}`, BACKUP_LABELS[status]);
    badge.dataset.status = status;
    badge.title = `Backup status: ${status}`;
    cell.append(badge);
    return cell;
  }

  // -- nights: dates and numbers shared by the trend chart and the Changes view ----------------
  // A night's date is the UTC date of its last_collected (docs/RULES.md, rule 11): shown in UTC.

  const nightFormat = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric",
    timeZone: "UTC" });
  const nightShortFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", timeZone: "UTC" });

  function formatNight(iso, short = false) {
    const day = new Date(`${String(iso).slice(0, 10)}T00:00:00Z`);
    if (Number.isNaN(day.getTime())) return String(iso);
    return (short ? nightShortFormat : nightFormat).format(day);
  }

  const compactFormat = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });

  // -- trend chart in the drill-down (docs/RULES.md, rule 11) ----------------------------------
  // An inline SVG made with DOM calls (the CSP allows no inline styles: colours come from classes);
  // a visually hidden table holds the same numbers for screen readers and for copying.

  const SVG_NS = "http://www.w3.org/2000/svg";
  const CHART = { width: 760, minWidth: 280, height: 180, left: 48, right: 20, top: 14, bottom: 36, maxLabels: 6,
    minLabelGap: 64 };
  const DAY_MS = 86400000;
  const SERIES = [
    { key: "m365_licensed_user_count", name: "M365 licensed", className: "m365" },
    { key: "es_user_count", name: "ES users", className: "es" },
  ];
  const trend = { controller: null };

  function svgNode(tag, attributes = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** A round axis maximum at or above ``max`` and its step, for about four gridlines. */
  function niceScale(max) {
    if (max <= 0) return { top: 1, step: 1 };
    const rough = max / 4;
    const power = 10 ** Math.floor(Math.log10(rough));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
    const whole = Math.max(1, Math.round(step));
    return { top: Math.ceil(max / whole) * whole, step: whole };
  }

  /** Indexes of the nights whose dates label the x axis: at most maxLabels, never closer than
   * minLabelGap, the first and the last always included. */
  function labelledIndexes(xs) {
    const every = Math.ceil(xs.length / CHART.maxLabels);
    const picked = [];
    for (let i = 0; i < xs.length; i += every) {
      if (!picked.length || xs[i] - xs[picked[picked.length - 1]] >= CHART.minLabelGap) picked.push(i);
    }
    const last = xs.length - 1;
    if (picked[picked.length - 1] !== last) {
      if (picked.length > 1 && xs[last] - xs[picked[picked.length - 1]] < CHART.minLabelGap) picked.pop();
      picked.push(last);
    }
    return picked;
  }

  function trendSvg(name, rows, width) {
    const plotWidth = width - CHART.left - CHART.right;
    const plotHeight = CHART.height - CHART.top - CHART.bottom;
    const max = Math.max(...rows.flatMap((r) => SERIES.map((s) => Number(r[s.key]) || 0)));
    const { top, step } = niceScale(max);
    // Time runs left to right in proportion: a night missing between two kept ones leaves a gap.
    const dayOf = (r) => Date.parse(`${r.date}T00:00:00Z`) / DAY_MS;
    const days = rows.map((r) => dayOf(r) - dayOf(rows[0]));
    const span = days[days.length - 1];
    const x = (i) => CHART.left + (rows.length === 1 || !(span > 0) ? plotWidth / 2 : (days[i] * plotWidth) / span);
    const y = (value) => CHART.top + plotHeight - (value / top) * plotHeight;
    const round = (v) => Math.round(v * 10) / 10;

    const first = rows[0];
    const last = rows[rows.length - 1];
    const root = svgNode("svg", { class: "trend__svg", viewBox: `0 0 ${width} ${CHART.height}`,
      role: "img", "aria-labelledby": "trend-svg-title trend-svg-desc", focusable: "false" });
    const summary = SERIES.map((s) => (rows.length === 1
      ? `${s.name}: ${fmt(first[s.key])} on ${formatNight(first.date)}`
      : `${s.name} went from ${fmt(first[s.key])} on ${formatNight(first.date)} to ${fmt(last[s.key])}`
        + ` on ${formatNight(last.date)}`)).join("; ");
    root.append(svgNode("title", { id: "trend-svg-title" }, `${name}: users on ${plural(rows.length, "kept night",
      "kept nights")}`), svgNode("desc", { id: "trend-svg-desc" }, `${summary}.`));

    const grid = svgNode("g", { class: "trend__grid", "aria-hidden": "true" });
    for (let value = 0; value <= top; value += step) {
      grid.append(svgNode("line", { x1: CHART.left, x2: width - CHART.right, y1: round(y(value)),
        y2: round(y(value)) }));
      grid.append(svgNode("text", { class: "trend__tick trend__tick--y", x: CHART.left - 8, y: round(y(value)),
        "text-anchor": "end", "dominant-baseline": "middle" }, compactFormat.format(value)));
    }
    const sameYear = first.date.slice(0, 4) === last.date.slice(0, 4);
    for (const i of labelledIndexes(rows.map((_, i) => x(i)))) {
      const anchor = rows.length === 1 ? "middle" : i === 0 ? "start" : i === rows.length - 1 ? "end" : "middle";
      grid.append(svgNode("text", { class: "trend__tick trend__tick--x", x: round(x(i)),
        y: CHART.height - CHART.bottom + 22, "text-anchor": anchor, "data-date": rows[i].date },
      formatNight(rows[i].date, sameYear)));
    }
    root.append(grid);

    for (const series of SERIES) {
      const group = svgNode("g", { class: `trend__series trend__series--${series.className}`,
        "data-series": series.key });
      const points = rows.map((r, i) => `${round(x(i))},${round(y(Number(r[series.key]) || 0))}`);
      if (rows.length > 1) group.append(svgNode("polyline", { class: "trend__line", points: points.join(" ") }));
      rows.forEach((r, i) => {
        const value = Number(r[series.key]) || 0;
        const dot = svgNode("circle", { class: "trend__dot", cx: round(x(i)), cy: round(y(value)), r: 3.5,
          "data-date": r.date, "data-value": value });
        dot.append(svgNode("title", {}, `${formatNight(r.date)}: ${fmt(value)} ${series.name}`));
        group.append(dot);
      });
      root.append(group);
    }
    return root;
  }

  function renderTrend(name, rows) {
    el.trendCaption.textContent = `${name}: ES and M365 licensed users on each kept night`;
    el.trendRows.replaceChildren(...rows.map((r) => {
      const row = make("tr");
      const night = make("th", "trend-date", formatNight(r.date));
      night.scope = "row";
      night.dataset.date = r.date;
      row.append(night, make("td", "num trend-es", fmt(r.es_user_count)),
        make("td", "num trend-m365", fmt(r.m365_licensed_user_count)));
      return row;
    }));
    el.trendLegend.hidden = rows.length === 0;
    // Drawn at the width it is shown at (one unit a pixel), so its text is as legible on a phone.
    const width = Math.max(CHART.minWidth, Math.round(el.trendChart.clientWidth) || CHART.width);
    el.trendChart.replaceChildren(...(rows.length ? [trendSvg(name, rows, width)] : []));
    if (rows.length === 0) {
      el.trendNote.textContent = "No kept night has this organization yet: its trend starts with its first "
        + "published night.";
    } else if (rows.length === 1) {
      el.trendNote.textContent = `Only one night is kept for this organization so far (${formatNight(rows[0].date)})`
        + ": the trend line starts with the next night.";
    } else {
      el.trendNote.textContent = `${plural(rows.length, "night", "nights")} kept, from `
        + `${formatNight(rows[0].date)} to ${formatNight(rows[rows.length - 1].date)}.`;
    }
  }

  async function loadTrend(name) {
    if (trend.controller) trend.controller.abort();
    const controller = new AbortController();
    trend.controller = controller;
    el.trend.hidden = false;
    el.trendNote.textContent = "Loading the trend…";
    el.trendLegend.hidden = true;
    el.trendChart.replaceChildren();
    el.trendRows.replaceChildren();
    try {
      // With no night kept at all there is nothing to ask for (the API would answer 404).
      const nights = await state.nightsLoaded.catch(() => null);
      if (controller.signal.aborted) return;
      if (nights && nights.length === 0) {
        renderTrend(name, []);
        return;
      }
      const { body } = await fetchJson(API.orgHistory(name), controller.signal);
      const rows = Array.isArray(body.history) ? body.history.filter((r) => typeof r.date === "string") : [];
      renderTrend(name, rows);
    } catch (err) {
      if (controller.signal.aborted) return;
      if (err.kind === "http" && err.status === 404) renderTrend(name, []); // on no kept night (yet)
      else el.trendNote.textContent = `The trend could not be loaded. ${err.message || err}`;
    } finally {
      if (trend.controller === controller) trend.controller = null;
    }
  }

  // -- Changes view (docs/RULES.md, rule 12) -----------------------------------------------------
  // Who changed from a chosen kept night to the latest one, optionally in one organization; the CSV
  // link is the API's own CSV of the same selection.

  const CHANGE_LABELS = {
    added: "Added", removed: "Removed", moved: "Moved", email_gained: "Email gained", email_lost: "Email lost",
    licenses_changed: "Licenses changed",
  };
  /** How the summary counts each kind: [one, many] ("1 license change", not "1 licenses changed"). */
  const CHANGE_COUNTS = {
    added: ["added", "added"], removed: ["removed", "removed"], moved: ["moved", "moved"],
    email_gained: ["gained an email license", "gained an email license"],
    email_lost: ["lost the email license", "lost the email license"],
    licenses_changed: ["license change", "license changes"],
  };
  const CHANGES_SHOWN_MAX = 2000; // more rows than anyone reads on a page: the CSV has them all
  const changesView = { nights: [], controller: null };

  function showChangesState(name, message = "") {
    el.changesLoading.hidden = name !== "loading";
    el.changesMessage.hidden = name !== "message";
    el.changesTable.hidden = name !== "table";
    el.changesMessageText.textContent = message;
    el.changes.setAttribute("aria-busy", String(name === "loading"));
  }

  async function initChanges(signal, nightsLoaded) {
    el.changes.hidden = false;
    const controls = el.changesSince.closest(".changes__form");
    let nights;
    try {
      nights = await nightsLoaded;
    } catch (err) {
      if (signal.aborted) return;
      controls.hidden = true;
      el.changesCsv.hidden = true;
      el.changesSummary.textContent = "";
      showChangesState("message", `The kept nights could not be loaded. ${err.message || err}`);
      return;
    }
    changesView.nights = nights;
    controls.hidden = nights.length < 2;
    if (nights.length < 2) {
      el.changesCsv.hidden = true;
      el.changesSummary.textContent = "";
      showChangesState("message", nights.length === 0
        ? "No night is kept yet: changes appear once two nights have been published."
        : `Only one night is kept so far (${formatNight(nights[0].date)}): changes appear after the next `
          + "published night.");
      return;
    }
    const dates = nights.map((n) => n.date);
    el.changesSince.min = dates[0];
    el.changesSince.max = dates[dates.length - 1];
    el.changesSince.value = dates[dates.length - 2]; // the previous night
    el.changesNights.replaceChildren(...dates.map((d) => Object.assign(make("option"), { value: d })));
    fillChangesOrganizations([]);
    loadChanges();
  }

  /** The organization filter: tonight's organizations, then those only earlier nights had (a customer
   * that left), as far as the unfiltered changes name them. Keeps the choice when it is still there. */
  function fillChangesOrganizations(namesInChanges) {
    const chosen = el.changesOrg.value;
    const tonight = state.organizations.map((item) => String(item.org[NAME_KEY])).sort(compareNames);
    const known = new Set(tonight);
    const earlier = [...new Set(namesInChanges)].filter((n) => typeof n === "string" && !known.has(n))
      .sort(compareNames);
    const option = (name) => Object.assign(make("option", "", name), { value: name });
    const options = [option("All organizations"), ...tonight.map(option)];
    options[0].value = "";
    if (earlier.length) {
      const group = make("optgroup");
      group.label = "Not published tonight";
      group.append(...earlier.map(option));
      options.push(group);
    }
    el.changesOrg.replaceChildren(...options);
    el.changesOrg.value = known.has(chosen) || earlier.includes(chosen) ? chosen : "";
  }

  async function loadChanges() {
    const nights = changesView.nights;
    if (nights.length < 2) return;
    if (changesView.controller) changesView.controller.abort();
    const controller = new AbortController();
    changesView.controller = controller;
    // An emptied date field means the default: the previous night.
    const previous = nights[nights.length - 2].date;
    const since = el.changesSince.value || previous;
    const org = el.changesOrg.value;
    el.changesCsv.href = API.changesSince(since, org, "csv");
    el.changesCsv.hidden = true;
    el.changesSummary.textContent = "";
    showChangesState("loading");
    try {
      // The default selection is the delta column's request (the same answer): one download, not two.
      const url = since === previous && !org ? API.changes : API.changesSince(since, org);
      const { body } = await fetchJson(url, controller.signal);
      renderChanges(Array.isArray(body.changes) ? body.changes : [], since, org, body);
      el.changesCsv.hidden = false;
    } catch (err) {
      if (controller.signal.aborted) return;
      const reason = err.kind === "http" && err.detail ? err.detail : (err.message || String(err));
      showChangesState("message", `No changes to show: ${reason.replace(/\.?$/u, ".")}`);
    } finally {
      if (changesView.controller === controller) changesView.controller = null;
    }
  }

  function renderChanges(changes, since, org, body) {
    if (!org) fillChangesOrganizations(changes.flatMap((c) => [c.organization_name, c.previous_organization_name]));
    const from = typeof body.from === "string" ? body.from.slice(0, 10) : since;
    const to = typeof body.to === "string" ? body.to.slice(0, 10) : "";
    const scope = org ? ` in ${org}` : "";
    const counts = Object.keys(CHANGE_LABELS).map((kind) => [kind, changes.filter((c) => c.change === kind).length])
      .filter(([, n]) => n > 0).map(([kind, n]) => plural(n, ...CHANGE_COUNTS[kind]));
    const range = `from the night of ${formatNight(from)} to ${formatNight(to)}`;
    const nearest = from !== since ? ` (the latest kept night on or before ${formatNight(since)})` : "";
    if (changes.length === 0) {
      el.changesRows.replaceChildren();
      showChangesState("message", `No changes${scope} ${range}${nearest}.`);
      return;
    }
    const shown = changes.slice(0, CHANGES_SHOWN_MAX);
    el.changesSummary.textContent = `${plural(changes.length, "change", "changes")}${scope} ${range}${nearest}: `
      + `${counts.join(", ")}.`
      + (shown.length < changes.length ? ` The first ${fmt(shown.length)} are listed; the CSV has all.` : "");
    el.changesRows.replaceChildren(...shown.map(changeRow));
    showChangesState("table");
  }

  /** A licenses field of a change: a dash when absent (null) or when the user has no license names (""). */
  function licensesText(value) {
    return value === null || value === undefined || value === "" ? "—" : String(value);
  }

  /** Rule 6's licenses as a list: split on ", ", one entry per name ignoring case. */
  function licenseNames(value) {
    if (typeof value !== "string" || value === "") return [];
    const seen = new Map();
    for (const name of value.split(", ")) if (!seen.has(name.toLowerCase())) seen.set(name.toLowerCase(), name);
    return [...seen.values()];
  }

  /** What a change added and removed: names compared ignoring case, as rule 6 counts them once. */
  function licenseDiff(before, after) {
    const was = new Set(licenseNames(before).map((n) => n.toLowerCase()));
    const now = new Set(licenseNames(after).map((n) => n.toLowerCase()));
    return { added: licenseNames(after).filter((n) => !was.has(n.toLowerCase())),
      removed: licenseNames(before).filter((n) => !now.has(n.toLowerCase())) };
  }

  function emailText(value) {
    return value === true ? "Yes" : value === false ? "No" : "—";
  }

  function changeRow(change) {
    const row = make("tr");
    const kind = String(change.change);
    row.dataset.change = kind;
    const kindCell = make("td", "change-kind");
    kindCell.append(make("span", `badge badge--change badge--${CHANGE_LABELS[kind] ? kind : "other"}`,
      CHANGE_LABELS[kind] || kind));
    const orgCell = make("td", "change-org");
    orgCell.append(make("span", "change-org__name", String(change.organization_name ?? "")));
    if (change.previous_organization_name !== null && change.previous_organization_name !== undefined) {
      const from = make("span", "change-org__from", "from ");
      from.append(make("span", "change-org__previous", String(change.previous_organization_name)));
      orgCell.append(from);
    }
    const user = make("td", "change-user");
    user.dataset.label = "User";
    user.append(make("span", "change-name", String(change.display_name ?? "")),
      make("span", "user-upn change-upn", String(change.user_principal_name ?? "")));
    const licenses = make("td", "change-licenses");
    licenses.dataset.label = "Licenses";
    const email = make("td", "center change-email");
    email.dataset.label = "Email license";
    const before = change.licenses_before;
    const after = change.licenses_after;
    if (typeof before === "string" && typeof after === "string") {
      const { added, removed } = licenseDiff(before, after);
      if (added.length || removed.length) {
        const diff = make("span", "change-diff");
        for (const name of added) diff.append(make("span", "change-diff__added", `+${name}`), " ");
        for (const name of removed) diff.append(make("span", "change-diff__removed", `\u2212${name}`), " ");
        diff.lastChild.remove();
        licenses.append(diff);
      }
    }
    for (const [when, label] of [["before", "Before"], ["after", "After"]]) {
      const line = make("span", `change-line change-line--${when}`);
      const value = change[`licenses_${when}`];
      const text = make("span", `change-licenses-${when}`, licensesText(value));
      if (value === "") text.classList.add("is-no-names");
      if (value === "") text.title = "No license names: the user is known only from the backup";
      line.append(make("span", "change-line__label", `${label}: `), text);
      licenses.append(line);
      if (when === "after") email.append(make("span", "change-arrow", " → "));
      email.append(make("span", `change-email-${when}`, emailText(change[`has_email_license_${when}`])));
    }
    row.append(kindCell, orgCell, user, licenses, email);
    return row;
  }


  // -- downloads with a byte-order mark (issue 26) ------------------------------------------------
  // Excel reads a CSV without a BOM in the machine's code page and garbles "Müller & Söhne". The API's
  // bytes stay as documented; the page fetches them (same origin, so the browser's HTTP Basic
  // credentials go along) and saves U+FEFF + those bytes under the server's file name.

  const BOM = new Uint8Array([0xef, 0xbb, 0xbf]);

  /** The file name of a Content-Disposition header (RFC 6266: filename* first), or "". */
  function dispositionName(header) {
    if (!header) return "";
    const extended = /filename\*\s*=\s*UTF-8''([^;]+)/iu.exec(header);
    if (extended) {
      try {
        return decodeURIComponent(extended[1].trim());
      } catch (_) {
        // fall through to the plain parameter
      }
    }
    const plain = /filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))/iu.exec(header);
    return plain ? (plain[1] !== undefined ? plain[1].replace(/\\(.)/gu, "$1") : plain[2]) : "";
  }

  async function downloadWithBom(link) {
    const response = await fetch(link.href, { headers: { Accept: "text/csv" } });
    if (!response.ok) {
      let message = response.statusText;
      try {
        const body = await response.json();
        if (body && typeof body.error === "string") message = body.error;
      } catch (_) {
        // not the API's error shape: the status says it
      }
      throw new Error(`HTTP ${response.status}: ${message}`);
    }
    const bytes = new Uint8Array(await response.arrayBuffer());
    const hasBom = bytes.length >= 3 && bytes[0] === BOM[0] && bytes[1] === BOM[1] && bytes[2] === BOM[2];
    const blob = new Blob(hasBom ? [bytes] : [BOM, bytes], { type: "text/csv;charset=utf-8" });
    const name = dispositionName(response.headers.get("Content-Disposition"))
      || link.getAttribute("download") || "m365.csv";
    const url = URL.createObjectURL(blob);
    const save = make("a");
    save.href = url;
    save.download = name;
    save.hidden = true;
    document.body.append(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function onDownloadClick(event) {
    const link = event.target.closest("a[data-bom]");
    if (!link || event.defaultPrevented || event.button !== 0) return;
    if (event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return; // the browser's own choices
    event.preventDefault();
    if (link.getAttribute("aria-busy") === "true") return;
    link.setAttribute("aria-busy", "true");
    el.downloadError.hidden = true;
    downloadWithBom(link).catch((err) => {
      el.downloadError.textContent = `The download failed. ${err.message || err}`;
      el.downloadError.hidden = false;
    }).finally(() => link.removeAttribute("aria-busy"));
  }

  // -- views: usage tonight and billing months ------------------------------------------------------

  function showView(name, focus = false) {
    const billing = name === "billing";
    el.tabUsage.setAttribute("aria-selected", String(!billing));
    el.tabBilling.setAttribute("aria-selected", String(billing));
    el.tabUsage.tabIndex = billing ? -1 : 0;
    el.tabBilling.tabIndex = billing ? 0 : -1;
    el.viewUsage.hidden = billing;
    el.viewBilling.hidden = !billing;
    if (focus) (billing ? el.tabBilling : el.tabUsage).focus();
    if (billing) initBilling();
  }

  function onTabKey(event) {
    if (!["ArrowLeft", "ArrowRight", "Home", "End"].includes(event.key)) return;
    event.preventDefault();
    const toBilling = event.key === "End" || (event.key !== "Home" && event.currentTarget === el.tabUsage);
    showView(toBilling ? "billing" : "usage", true);
  }

  // -- Billing months (docs/RULES.md, rules 14 and 15) -----------------------------------------------
  // Loaded only when the viewer opens the view. The months are those with a kept night (from
  // /api/m365/history); a month is closed once a later night is kept, and then shows its seal.

  const BASES = { peak: "peak", end: "end of month", average: "daily average" };
  const BILLING_METRICS = [
    { key: "es_user_count", total: "total_es_user_count", cell: "billingTotalEs" },
    { key: "m365_licensed_user_count", total: "total_m365_licensed_user_count", cell: "billingTotalM365" },
    { key: "backup_seats", total: "total_backup_seats", cell: "billingTotalBackup" },
  ];
  const SEAL_LENGTH = 12;
  const monthFormat = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "long", timeZone: "UTC" });
  const averageFormat = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const billing = {
    started: false, months: [], bodies: new Map(), rows: [], body: null, sortKey: NAME_KEY, sortDir: "ascending",
    controller: null, orgController: null, opener: null,
  };

  function formatMonth(month) {
    const day = new Date(`${month}-01T00:00:00Z`);
    return Number.isNaN(day.getTime()) ? month : monthFormat.format(day);
  }

  const shortSeal = (sha) => String(sha).slice(0, SEAL_LENGTH);

  /** A figure on a basis: averages with two decimals (rule 14 rounds them so), counts whole. */
  function billingFigure(value, basis) {
    const n = Number(value) || 0;
    return basis === "average" ? averageFormat.format(n) : fmt(n);
  }

  /** The kept months, oldest first: [{month, closed}] from the kept nights' dates. */
  function keptMonths(nights) {
    const months = [...new Set(nights.map((n) => n.date.slice(0, 7)))].sort();
    return months.map((month, i) => ({ month, closed: i < months.length - 1 }));
  }

  function showBillingState(name, message = "") {
    el.billingLoading.hidden = name !== "loading";
    el.billingMessage.hidden = name !== "message";
    el.billingTable.hidden = name !== "table";
    el.billingStatus.hidden = name !== "table";
    el.billingMessageText.textContent = message;
    el.viewBilling.setAttribute("aria-busy", String(name === "loading"));
  }

  function monthOptionText(entry) {
    const body = billing.bodies.get(entry.month);
    const closed = body ? body.closed === true : entry.closed;
    if (!closed) return `${formatMonth(entry.month)} · open`;
    const sha = body && typeof body.sha256 === "string" ? ` · sealed ${shortSeal(body.sha256)}` : " · closed";
    return `${formatMonth(entry.month)}${sha}`;
  }

  function fillMonthOptions() {
    const chosen = el.billingMonth.value;
    el.billingMonth.replaceChildren(...[...billing.months].reverse().map((entry) => {
      const option = make("option", "", monthOptionText(entry));
      option.value = entry.month;
      option.dataset.state = (billing.bodies.get(entry.month)?.closed ?? entry.closed) ? "closed" : "open";
      return option;
    }));
    if (chosen && billing.months.some((m) => m.month === chosen)) el.billingMonth.value = chosen;
  }

  /** A reloaded summary may bring new nights: the billing view asks again when it is next shown. */
  function resetBilling() {
    if (billing.controller) billing.controller.abort();
    billing.started = false;
    billing.bodies.clear();
    if (!el.viewBilling.hidden) initBilling();
  }

  async function initBilling() {
    if (billing.started) return;
    billing.started = true;
    showBillingState("loading");
    let nights;
    try {
      nights = await state.nightsLoaded;
    } catch (err) {
      if (err.kind === "http" && err.status === 404) {
        nights = []; // the history's word for "no night is kept yet"
      } else {
        billing.started = false; // the next visit tries again
        showBillingState("message", `The kept nights could not be loaded. ${err.message || err}`);
        return;
      }
    }
    billing.months = keptMonths(nights);
    el.billingMonth.closest(".changes__form").hidden = billing.months.length === 0;
    el.billingSearch.closest(".search").hidden = billing.months.length === 0;
    if (billing.months.length === 0) {
      showBillingState("message", "No night is kept yet: a billing month appears with its first published night.");
      return;
    }
    fillMonthOptions();
    el.billingMonth.value = billing.months[billing.months.length - 1].month;
    await loadBillingMonth();
    // The seals of the other closed months, for the picker (small answers, asked once each).
    for (const entry of billing.months) {
      if (!entry.closed || billing.bodies.has(entry.month) || !billing.available) continue;
      fetchJson(API.billing(entry.month)).then(({ body }) => {
        billing.bodies.set(entry.month, body);
        fillMonthOptions();
      }).catch(() => {});
    }
  }

  async function loadBillingMonth() {
    const month = el.billingMonth.value;
    if (!month) return;
    if (billing.controller) billing.controller.abort();
    const controller = new AbortController();
    billing.controller = controller;
    try {
      let body = billing.bodies.get(month);
      if (!body) {
        showBillingState("loading");
        ({ body } = await fetchJson(API.billing(month), controller.signal));
        billing.bodies.set(month, body);
      }
      billing.available = true;
      renderBillingMonth(month, body);
      fillMonthOptions();
    } catch (err) {
      if (controller.signal.aborted) return;
      // The server's word for a path it does not know: an m365-serve from before billing months.
      const missing = err.kind === "http" && err.status === 404 && err.detail === "not found";
      showBillingState("message", missing
        ? "This server does not publish billing months: update m365-serve and run the pipeline again."
        : `The billing month could not be loaded. ${err.detail || err.message || err}`);
    } finally {
      if (billing.controller === controller) billing.controller = null;
    }
  }

  function renderBillingMonth(month, body) {
    billing.body = body;
    const organizations = Array.isArray(body.organizations) ? body.organizations : [];
    billing.rows = organizations.map((org, index) => {
      const row = make("tr");
      const nameCell = make("th", "col-name");
      nameCell.scope = "row";
      const button = make("button", "org-link", String(org.organization_name));
      button.type = "button";
      button.dataset.index = String(index);
      nameCell.append(button);
      row.append(nameCell, ...BILLING_METRICS.map(() => make("td", "num")));
      return { org, row, lowerName: String(org.organization_name).toLowerCase() };
    });
    const days = Number(body.days) || 0;
    const nights = Number(body.nights) || 0;
    const kept = `${plural(nights, "kept night", "kept nights")}${nights && body.first_night
      ? ` (${formatNight(body.first_night)}${nights > 1 ? ` to ${formatNight(body.last_night)}` : ""})` : ""}`;
    el.billingState.replaceChildren();
    if (body.closed === true) {
      const seal = make("code", "billing-seal", shortSeal(body.sha256 ?? ""));
      seal.title = `SHA-256 of the month's CSV: ${body.sha256}`;
      el.billingState.dataset.state = "closed";
      el.billingState.append(make("span", "badge badge--closed", "Closed"), ` ${formatMonth(month)}, sealed `, seal,
        `: its figures never change. ${plural(days, "day", "days")}, ${kept}.`);
    } else {
      el.billingState.dataset.state = "open";
      el.billingState.append(make("span", "badge badge--open", "Open"), ` ${formatMonth(month)} so far: `
        + `${plural(days, "day", "days")}, ${kept}. The figures change with each night until the month closes.`);
    }
    el.billingCsv.href = API.billing(month, undefined, "csv");
    el.billingCsv.download = `m365-billing-${month}.csv`;
    el.billingItemsCsv.href = API.billingItems(month, "csv");
    el.billingItemsCsv.download = `m365-billing-items-${month}.csv`;
    showBillingState("table");
    applyBillingOrder();
  }

  function applyBillingOrder() {
    const basis = el.billingBasis.value;
    const field = (key) => (key === NAME_KEY ? key : `${key}_${basis}`);
    const direction = billing.sortDir === "ascending" ? 1 : -1;
    const byName = (a, b) => compareNames(a.org[NAME_KEY], b.org[NAME_KEY]);
    const key = billing.sortKey;
    const sorted = [...billing.rows].sort((a, b) => (key === NAME_KEY ? direction * byName(a, b)
      : direction * ((Number(a.org[field(key)]) || 0) - (Number(b.org[field(key)]) || 0)) || byName(a, b)));
    const query = el.billingSearch.value;
    const needle = query.trim() ? query.toLowerCase() : "";
    const fragment = document.createDocumentFragment();
    let shown = 0;
    for (const item of sorted) {
      item.row.hidden = needle !== "" && !item.lowerName.includes(needle);
      if (!item.row.hidden) shown += 1;
      BILLING_METRICS.forEach((metric, i) => {
        const value = item.org[field(metric.key)];
        const cell = item.row.cells[i + 1];
        cell.textContent = billingFigure(value, basis);
        cell.classList.toggle("is-zero", !(Number(value) > 0));
      });
      fragment.append(item.row);
    }
    if (shown === 0) {
      const row = make("tr", "no-match");
      const cell = make("td", "", billing.rows.length === 0 ? "No organization is in this month's report."
        : `No organizations match “${query.trim()}”.`);
      cell.colSpan = 4;
      row.append(cell);
      fragment.append(row);
    }
    el.billingRows.replaceChildren(fragment);
    el.billingCount.textContent = `${fmt(shown)} of ${plural(billing.rows.length, "organization", "organizations")}`;
    const matching = needle === "" ? null : billing.rows.filter((item) => !item.row.hidden);
    const totals = (billing.body && billing.body.totals) || {};
    el.billingTotalOrgs.textContent = matching
      ? `of ${plural(matching.length, "shown organization", "shown organizations")}`
      : plural(totals.total_organizations ?? billing.rows.length, "organization", "organizations");
    for (const metric of BILLING_METRICS) {
      const value = matching
        ? matching.reduce((s, item) => s + (Number(item.org[field(metric.key)]) || 0), 0)
        : totals[`${metric.total}_${basis}`];
      // Sums of two-decimal averages: rounded again, so float noise never shows.
      el[metric.cell].textContent = billingFigure(basis === "average" ? Math.round(value * 100) / 100 : value, basis);
    }
    for (const th of el.billingTable.tHead.querySelectorAll("th[data-key]")) {
      th.setAttribute("aria-sort", th.dataset.key === billing.sortKey ? billing.sortDir : "none");
    }
  }

  function onBillingSortClick(event) {
    const button = event.target.closest("button.sort");
    if (!button) return;
    const key = button.closest("th").dataset.key;
    if (key === billing.sortKey) {
      billing.sortDir = billing.sortDir === "ascending" ? "descending" : "ascending";
    } else {
      billing.sortKey = key;
      billing.sortDir = key === NAME_KEY ? "ascending" : "descending";
    }
    applyBillingOrder();
  }

  function showBillingOrgState(name, message = "") {
    el.billingOrgLoading.hidden = name !== "loading";
    el.billingOrgMessage.hidden = name !== "message";
    el.billingOrgTable.hidden = name !== "table";
    el.billingOrgCsv.hidden = name !== "table";
    el.billingOrgMessageText.textContent = message;
    el.billingDialog.setAttribute("aria-busy", String(name === "loading"));
  }

  async function openBillingOrg(item, opener) {
    const month = el.billingMonth.value;
    const name = String(item.org.organization_name);
    billing.opener = opener;
    el.billingOrgMonth.textContent = `Billing · ${formatMonth(month)}`;
    el.billingOrgTitle.textContent = name;
    const basis = el.billingBasis.value;
    el.billingOrgMeta.textContent = BILLING_METRICS.map((m, i) => `${["ES users", "licensed users", "backup seats"][i]} `
      + billingFigure(item.org[`${m.key}_${basis}`], basis)).join(" · ") + ` (${BASES[basis]})`;
    el.billingOrgRows.replaceChildren();
    for (const th of el.billingOrgTable.tHead.querySelectorAll("th[data-basis]")) {
      th.classList.toggle("is-basis", th.dataset.basis === basis);
    }
    if (!el.billingDialog.open) el.billingDialog.showModal();
    el.billingOrgClose.focus();
    if (billing.orgController) billing.orgController.abort();
    const controller = new AbortController();
    billing.orgController = controller;
    showBillingOrgState("loading");
    try {
      const { body } = await fetchJson(API.billing(month, name), controller.signal);
      const licenses = Array.isArray(body.licenses) ? body.licenses : [];
      el.billingOrgCaption.textContent = `${name}: licenses in ${formatMonth(month)}`;
      el.billingOrgRows.replaceChildren(...licenses.map((lic) => {
        const row = make("tr");
        const cell = make("th", "billing-license", String(lic.license_name ?? ""));
        cell.scope = "row";
        row.append(cell, ...["peak", "end", "average", "seat_days"].map((b) => {
          const td = make("td", `num${b === basis ? " is-basis" : ""}`, billingFigure(lic[`users_${b}`], b));
          td.dataset.basis = b;
          return td;
        }));
        return row;
      }));
      el.billingOrgCsv.href = API.billing(month, name, "csv");
      el.billingOrgCsv.download = `m365-billing-${month}-licenses.csv`;
      if (licenses.length === 0) {
        showBillingOrgState("message", `No user of ${name} held a license on the days of ${formatMonth(month)}.`);
      } else {
        showBillingOrgState("table");
      }
    } catch (err) {
      if (controller.signal.aborted) return;
      showBillingOrgState("message", `The licenses could not be loaded. ${err.detail || err.message || err}`);
    } finally {
      if (billing.orgController === controller) billing.orgController = null;
    }
  }

  // -- wiring -----------------------------------------------------------------------------

  el.orgTable.tHead.addEventListener("click", onSortClick);
  el.orgSearch.addEventListener("input", applyOrder);
  el.orgRows.addEventListener("click", (event) => {
    const button = event.target.closest("button.org-link");
    if (!button) return;
    const item = state.organizations[Number(button.dataset.index)];
    if (item) openUsers(item, button);
  });
  el.errorRetry.addEventListener("click", loadSummary);
  el.emptyRetry.addEventListener("click", loadSummary);
  el.usersClose.addEventListener("click", () => el.dialog.close());
  el.usersRetry.addEventListener("click", loadUsers);
  el.userSearch.addEventListener("input", renderUsers);
  el.userSearch.addEventListener("search", renderUsers); // Escape in a search box clears it first
  el.orgSearch.addEventListener("search", applyOrder);
  el.dialog.addEventListener("close", onDialogClose);
  el.dialog.addEventListener("click", onDialogClick);
  el.changesSince.addEventListener("change", loadChanges);
  el.changesOrg.addEventListener("change", loadChanges);
  document.addEventListener("click", onDownloadClick);
  el.tabUsage.addEventListener("click", () => showView("usage"));
  el.tabBilling.addEventListener("click", () => showView("billing"));
  el.tabUsage.addEventListener("keydown", onTabKey);
  el.tabBilling.addEventListener("keydown", onTabKey);
  el.billingMonth.addEventListener("change", loadBillingMonth);
  el.billingBasis.addEventListener("change", applyBillingOrder);
  el.billingSearch.addEventListener("input", applyBillingOrder);
  el.billingSearch.addEventListener("search", applyBillingOrder);
  el.billingTable.tHead.addEventListener("click", onBillingSortClick);
  el.billingRows.addEventListener("click", (event) => {
    const button = event.target.closest("button.org-link");
    if (!button) return;
    const item = billing.rows[Number(button.dataset.index)];
    if (item) openBillingOrg(item, button);
  });
  el.billingOrgClose.addEventListener("click", () => el.billingDialog.close());
  el.billingDialog.addEventListener("close", () => {
    if (billing.orgController) billing.orgController.abort();
    if (billing.opener && billing.opener.isConnected) billing.opener.focus();
    billing.opener = null;
  });
  el.billingDialog.addEventListener("click", (event) => {
    if (event.target !== el.billingDialog) return;
    const box = el.billingDialog.getBoundingClientRect();
    if (event.clientX < box.left || event.clientX > box.right || event.clientY < box.top
      || event.clientY > box.bottom) el.billingDialog.close();
  });
  setInterval(() => { if (!el.content.hidden) updateFreshness(); }, 60000);

  loadSummary();
})();
