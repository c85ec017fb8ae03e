//! `twtrace top`: the aggregate, live, full screen. Refreshed every second; keys switch the
//! grouping (`g`), the sort (`s`) and set a filter on the group key (`/`, Enter applies, Esc
//! cancels, Ctrl-U empties the prompt); Esc clears the filter; `q` or Ctrl-C quits. Narrower
//! than 80 columns, the less telling columns go first (P50, ENDED, BORN, BORN/S), never the
//! key's width or the owner. The terminal is restored on every way out (quit, SIGTERM, SIGHUP,
//! an error, a panic).

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use ratatui::{
    Frame,
    crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Paragraph, Row as TableRow, Table},
};
use tokio::sync::mpsc;

use crate::{
    cli::TopArgs,
    failure::{Code, Failure},
    output::{self, printable},
    present::report::{self, Context, Sort},
    say,
    track::aggregate::{Aggregator, By},
    track::session::{self, Session},
    views::report::{context, request},
};

/// What the user chose on screen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Screen {
    pub by: By,
    pub sort: Sort,
    /// Applied filter: rows whose key contains it.
    pub filter: String,
    /// Some while typing a filter after `/`.
    pub editing: Option<String>,
}

pub enum Action {
    Quit,
    Redraw,
    None,
}

fn next<T: Copy + PartialEq>(all: &[T], cur: T) -> T {
    let i = all.iter().position(|&x| x == cur).unwrap_or(0);
    all[(i + 1) % all.len()]
}

impl Screen {
    pub fn key(&mut self, k: KeyEvent) -> Action {
        if k.kind == KeyEventKind::Release {
            return Action::None;
        }
        let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl_c {
            return Action::Quit;
        }
        if let Some(buf) = &mut self.editing {
            match k.code {
                KeyCode::Enter => {
                    self.filter = std::mem::take(buf);
                    self.editing = None;
                }
                KeyCode::Esc => self.editing = None,
                KeyCode::Char('u') if k.modifiers.contains(KeyModifiers::CONTROL) => buf.clear(),
                KeyCode::Backspace => {
                    buf.pop();
                }
                KeyCode::Char(c) if buf.len() < 64 => buf.push(c),
                _ => return Action::None,
            }
            return Action::Redraw;
        }
        match k.code {
            KeyCode::Char('q') => Action::Quit,
            KeyCode::Esc if !self.filter.is_empty() => {
                self.filter.clear();
                Action::Redraw
            }
            KeyCode::Char('g') => {
                self.by = next(&By::ALL, self.by);
                Action::Redraw
            }
            KeyCode::Char('s') => {
                self.sort = next(&Sort::ALL, self.sort);
                Action::Redraw
            }
            KeyCode::Char('/') => {
                self.editing = Some(self.filter.clone());
                Action::Redraw
            }
            _ => Action::None,
        }
    }
}

/// Host figures shown in the header, refreshed every second.
#[derive(Clone, Debug, Default)]
pub struct Header {
    pub births_per_s: f64,
}

pub fn draw(f: &mut Frame, agg: &Aggregator, ctx: &Context, head: &Header, screen: &Screen) {
    let [title, totals, kernel, table, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let t = agg.totals();
    let filter = match &screen.editing {
        Some(buf) => format!("  filter: {buf}_"),
        None if !screen.filter.is_empty() => format!("  filter: {}", screen.filter),
        None => String::new(),
    };
    f.render_widget(
        Paragraph::new(Line::from(format!(
            "twtrace top  by {}  sorted by {}{filter}",
            screen.by,
            screen.sort.as_str()
        )))
        .style(Style::default().add_modifier(Modifier::BOLD)),
        title,
    );
    let kernel_tw = ctx
        .kernel_time_wait()
        .map_or("-".to_owned(), |n| n.to_string());
    f.render_widget(
        Paragraph::new(format!(
            "TIME_WAIT {} (kernel {kernel_tw})  births/s {:.1}  born {}  ended {}  lost {}",
            t.in_time_wait,
            head.births_per_s,
            t.entered,
            t.exited,
            ctx.loss.total()
        )),
        totals,
    );
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |n| n.to_string());
    // Per namespace these may differ: shown when they agree ("-" otherwise; report has them
    // per namespace).
    let buckets = {
        let mut it = ctx.namespaces.iter().map(|n| n.max_tw_buckets);
        it.next()
            .flatten()
            .filter(|&first| it.all(|b| b == Some(first)))
    };
    f.render_widget(
        Paragraph::new(format!(
            "ephemeral ports {}  max_tw_buckets {}  skipped {}  CLOSE_WAIT {}  netns {}",
            opt(ctx.ephemeral_ports().map(u64::from)),
            opt(buckets),
            ctx.skipped_overflow(),
            ctx.close_wait.iter().map(|c| c.sockets).sum::<u64>(),
            ctx.namespaces.len()
        )),
        kernel,
    );
    let needle = screen.filter.as_str();
    let (rows, other) = report::rows(
        agg,
        screen.by,
        screen.sort,
        table.height as usize,
        ctx,
        &|k| needle.is_empty() || k.to_string().contains(needle),
    );
    // A FAIL column (connect() calls that never connected) only while some row has failures.
    let failed_col = rows
        .iter()
        .any(|r| r.connect_failures.iter().any(|&n| n > 0));
    // The columns that fit: the key keeps the width of an IPv4 ADDR:PORT and the owner at
    // least a process name; the figures go, least telling first, when the screen is narrow
    // (FAIL, when shown, is kept: failures are what the user is looking for).
    let fail_width = if failed_col { FIGURE_WIDTH + 1 } else { 0 };
    let shown = columns(table.width.saturating_sub(fail_width));
    let body: Vec<TableRow> = rows
        .iter()
        .chain(other.iter().filter(|_| needle.is_empty()))
        .map(|r| {
            let owner = r
                .processes
                .first()
                .map(|(pid, comm)| format!("{comm}[{pid}]"))
                .unwrap_or_default();
            // The namespace of each row when several are in play (its name alone for
            // --by netns, where it is the key).
            let (key, owner) = if screen.by == By::Netns && r.netns != 0 {
                (r.netns_name.clone(), owner)
            } else if ctx.several_namespaces() && r.netns != 0 {
                (
                    r.key.clone(),
                    format!("{} {owner}", report::clip(&r.netns_name, 12)),
                )
            } else {
                (r.key.clone(), owner)
            };
            let figures = [
                r.in_time_wait.to_string(),
                r.rate_10s
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}")),
                r.entered.to_string(),
                r.exited.to_string(),
                report::fmt_ms(r.p50_ms),
            ];
            let mut cells = vec![printable(&key).into_owned()];
            cells.extend(
                figures
                    .into_iter()
                    .zip(shown)
                    .filter(|(_, on)| *on)
                    .map(|(c, _)| c),
            );
            if failed_col {
                cells.push(r.connect_failures.iter().sum::<u64>().to_string());
            }
            cells.push(printable(&owner).into_owned());
            TableRow::new(cells)
        })
        .collect();
    let mut widths = vec![Constraint::Length(KEY_WIDTH)];
    widths.extend(
        shown
            .iter()
            .filter(|on| **on)
            .map(|_| Constraint::Length(FIGURE_WIDTH)),
    );
    if failed_col {
        widths.push(Constraint::Length(FIGURE_WIDTH));
    }
    widths.push(Constraint::Fill(1));
    let mut titles = vec![screen.by.as_str().to_uppercase()];
    titles.extend(
        FIGURES
            .iter()
            .zip(shown)
            .filter(|(_, on)| *on)
            .map(|(t, _)| t.to_string()),
    );
    if failed_col {
        titles.push("FAIL".into());
    }
    titles.push(if ctx.several_namespaces() {
        "NETNS OWNER".into()
    } else {
        "OWNER".into()
    });
    f.render_widget(
        Table::new(body, widths)
            .header(TableRow::new(titles).style(Style::default().add_modifier(Modifier::REVERSED))),
        table,
    );
    let keys = if screen.editing.is_some() {
        "Enter apply  Esc cancel  Ctrl-U empty"
    } else if !screen.filter.is_empty() {
        "g grouping  s sort  / filter  Esc clear filter  q quit"
    } else {
        "g grouping  s sort  / filter  q quit"
    };
    f.render_widget(Paragraph::new(keys), footer);
}

/// The figures' column titles, in order.
const FIGURES: [&str; 5] = ["TW", "BORN/S", "BORN", "ENDED", "P50"];
/// An IPv4 `ADDR:PORT` key.
const KEY_WIDTH: u16 = 21;
const FIGURE_WIDTH: u16 = 6;
/// The owner column's least: a 15-byte process name and a pid of up to 6 digits.
const OWNER_MIN: u16 = 23;

/// Which figures fit in `width` columns beside the key and the owner (one space between
/// columns): P50 goes first, then ENDED, BORN and BORN/S; TW always stays.
pub fn columns(width: u16) -> [bool; 5] {
    let mut on = [true; 5];
    let need = |on: &[bool; 5]| {
        KEY_WIDTH + 1 + on.iter().filter(|o| **o).count() as u16 * (FIGURE_WIDTH + 1) + OWNER_MIN
    };
    for drop in [4, 3, 2, 1] {
        if need(&on) <= width {
            break;
        }
        on[drop] = false;
    }
    on
}

/// Restores the terminal when dropped, whatever the way out.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        return Err(Failure::new(
            Code::Usage,
            "top needs a terminal; when piping, use `twtrace report` or `twtrace watch --json`",
        )
        .into());
    }
    let filter = args.filter.to_filter();
    let stats_file = output::create_opt("--stats-json", args.probe.stats_json.as_ref())?;
    // The handlers first: a signal from now on (while attaching too) ends the run cleanly.
    let stop = session::stop_signal(None)?;
    tokio::pin!(stop);
    let mut session = Session::start(args.probe.options(), true)?;
    if let Some(line) = session.host.tell_once() {
        say!("{line}");
    }
    let mut agg = Aggregator::new(args.group.max_groups);
    agg.set_listening_ports(session.listening.clone());
    let mut screen = Screen {
        by: args.group.by,
        sort: args.group.sort,
        filter: String::new(),
        editing: None,
    };

    // Keys are read on a thread of their own (crossterm's read blocks).
    let (keys_tx, mut keys) = mpsc::channel::<KeyEvent>(64);
    std::thread::spawn(move || {
        while !keys_tx.is_closed() {
            if event::poll(Duration::from_millis(200)).unwrap_or(false)
                && let Ok(TermEvent::Key(k)) = event::read()
                && keys_tx.blocking_send(k).is_err()
            {
                break;
            }
        }
    });

    let mut terminal = ratatui::try_init()?;
    let _guard = TerminalGuard;
    let started = Instant::now();
    session.gather(&request(&agg, &filter.netns, true));
    let mut ctx = context(&session, &agg, &filter.netns, started);
    let mut head = Header { births_per_s: 0.0 };
    let mut last_entered = 0;
    let mut last_close_wait = Instant::now();
    let mut second = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            k = keys.recv() => match k.map(|k| screen.key(k)) {
                Some(Action::Quit) | None => break,
                Some(Action::Redraw) => {}
                Some(Action::None) => continue,
            },
            r = session.next() => {
                for ev in r?.iter().filter(|e| filter.matches(e)) {
                    agg.on_event(ev);
                }
                continue;
            }
            _ = second.tick() => {
                agg.tick();
                // Finding CLOSE_WAIT owners walks /proc and each namespace's connection
                // table: every 5 s is enough.
                let scan = last_close_wait.elapsed() >= Duration::from_secs(5);
                if scan {
                    last_close_wait = Instant::now();
                }
                session.gather(&request(&agg, &filter.netns, scan));
                let seen: Vec<(u32, u64)> = agg.namespaces().collect();
                for gone in session.host.gone(seen.into_iter()) {
                    agg.forget_netns(gone);
                }
                ctx = context(&session, &agg, &filter.netns, started);
                let t = agg.totals();
                head.births_per_s = (t.entered - last_entered) as f64;
                last_entered = t.entered;
            }
        }
        terminal.draw(|f| draw(f, &agg, &ctx, &head, &screen))?;
    }
    drop(_guard);
    session.write_stats(stats_file)?;
    let loss = session.loss();
    if loss.total() > 0 {
        say!("{}", session::loss_line(&loss));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::{
        kernel::decode::{Conn, Process, Role},
        track::lifecycle::{Event, TwEnter},
    };

    fn agg() -> Aggregator {
        let mut a = Aggregator::new(100);
        for i in 0..30u64 {
            a.on_event(&Event::Enter(TwEnter {
                netns: 0,
                ts_ns: 5_000_000_000,
                timer: i + 1,
                conn: Conn {
                    local: format!("10.0.0.1:{}", 40000 + i).parse().unwrap(),
                    remote: format!("10.0.{}.2:6379", i % 3).parse().unwrap(),
                },
                owner: Some(Process {
                    pid: 100 + (i % 2) as u32,
                    tid: 1,
                    comm: "api".into(),
                    cgroup_id: 1,
                }),
                role: Role::Connected,
                timeout_jiffies: 0,
                substate: crate::track::lifecycle::Substate::TimeWait,
                bound: false,
                seeded: false,
            }));
        }
        a
    }

    fn screen_text(a: &Aggregator, s: &Screen) -> String {
        screen_text_at(80, a, s)
    }

    fn screen_text_at(width: u16, a: &Aggregator, s: &Screen) -> String {
        let mut t = Terminal::new(TestBackend::new(width, 24)).unwrap();
        let ctx = Context {
            duration_s: 5.0,
            now_sec: 6,
            namespaces: vec![crate::present::report::NsContext {
                netns: 0,
                name: "host".into(),
                kernel_time_wait: Some(31),
                ephemeral_ports: Some(28232),
                max_tw_buckets: Some(131072),
                skipped_overflow: 0,
            }],
            ..Context::default()
        };
        t.draw(|f| draw(f, a, &ctx, &Header::default(), s)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..24)
            .map(|y| {
                (0..width)
                    .map(|x| buf[(x, y)].symbol().to_owned())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn screen() -> Screen {
        Screen {
            by: By::Peer,
            sort: Sort::TimeWait,
            filter: String::new(),
            editing: None,
        }
    }

    #[test]
    fn fits_80x24_with_header_and_rows() {
        let text = screen_text(&agg(), &screen());
        assert!(text.contains("by peer"), "{text}");
        assert!(text.contains("TIME_WAIT 30 (kernel 31)"), "{text}");
        assert!(text.contains("ephemeral ports 28232"), "{text}");
        assert!(text.contains("10.0.0.2:6379"), "{text}");
        assert!(text.contains("q quit"), "{text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("10.0.1.2:6379"))
            .unwrap();
        assert!(row.contains(" 10 "), "{row}");
    }

    #[test]
    fn keys_switch_grouping_sort_and_filter() {
        let key = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE);
        let mut s = screen();
        assert!(matches!(s.key(key('g')), Action::Redraw));
        assert_eq!(s.by, By::Port);
        s.key(key('s'));
        assert_eq!(s.sort, Sort::Rate);
        s.key(key('/'));
        for c in "10.0.2".chars() {
            s.key(key(c));
        }
        s.key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        assert_eq!(s.filter, "10.0.2");
        s.by = By::Peer;
        let text = screen_text(&agg(), &s);
        assert!(
            text.contains("10.0.2.2:6379") && !text.contains("10.0.1.2:6379"),
            "{text}"
        );
        assert!(matches!(s.key(key('q')), Action::Quit));
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert!(matches!(screen().key(ctrl_c), Action::Quit));
    }

    /// A filter is cleared in one key: Esc outside the prompt (which no longer quits), Ctrl-U
    /// inside it.
    #[test]
    fn a_filter_clears_in_one_key_and_esc_does_not_quit() {
        let key = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE);
        let esc = KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE);
        let mut s = screen();
        assert!(!matches!(s.key(esc), Action::Quit), "Esc quits nothing");
        s.filter = "10.0.2".into();
        assert!(matches!(s.key(esc), Action::Redraw));
        assert_eq!(s.filter, "");
        s.filter = "10.0.2".into();
        s.key(key('/'));
        s.key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
        assert_eq!(s.editing.as_deref(), Some(""));
        s.key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        assert_eq!(s.filter, "");
    }

    /// Narrower than 80 columns, figures go before the key is cut or the owner dropped.
    #[test]
    fn narrow_screens_keep_the_key_and_the_owner() {
        let mut a = agg();
        a.on_event(&Event::Enter(TwEnter {
            netns: 0,
            ts_ns: 5_000_000_000,
            timer: 999,
            conn: Conn {
                local: "10.0.0.1:50000".parse().unwrap(),
                remote: "192.168.100.200:65000".parse().unwrap(),
            },
            owner: Some(Process {
                pid: 123_456,
                tid: 1,
                comm: "a-long-procname".into(),
                cgroup_id: 1,
            }),
            role: Role::Connected,
            timeout_jiffies: 0,
            substate: crate::track::lifecycle::Substate::TimeWait,
            bound: false,
            seeded: false,
        }));
        for width in [56u16, 60, 70, 79] {
            let text = screen_text_at(width, &a, &screen());
            let row = text
                .lines()
                .find(|l| l.starts_with("192.168.100.200:65000"))
                .unwrap_or_else(|| panic!("{width} columns:\n{text}"));
            assert!(row.contains("a-long-procname[123456]"), "{width}: {row}");
            assert!(text.contains("OWNER"), "{width}:\n{text}");
        }
        assert_eq!(columns(80), [true; 5]);
        assert_eq!(columns(60), [true, true, false, false, false]);
    }
}
