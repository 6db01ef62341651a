//! Glob matching exactly as Redis matches PSUBSCRIBE patterns (`stringmatchlen` in
//! Redis' util.c): `*`, `?`, `[abc]`, `[^a]`, `[a-z]` and `\` escapes, byte-wise and
//! case-sensitive. Ported rather than taken from a glob crate because file-system glob
//! crates treat `/`, `**` and unterminated classes differently, and a pattern must match
//! here exactly what it would match on a Redis server.

/// Whether `pattern` matches `subject` as Redis PSUBSCRIBE would match a channel.
pub fn matches(pattern: &[u8], subject: &[u8]) -> bool {
    let mut skip_longer = false;
    match_impl(pattern, subject, &mut skip_longer, 0)
}

/// Whether a channel name contains glob metacharacters (so it is a pattern, not a name).
pub fn is_pattern(s: &[u8]) -> bool {
    s.iter().any(|b| matches!(b, b'*' | b'?' | b'['))
}

fn match_impl(mut p: &[u8], mut s: &[u8], skip_longer: &mut bool, nesting: u32) -> bool {
    // Redis' own protection against abusive patterns.
    if nesting > 1000 {
        return false;
    }
    while !p.is_empty() && !s.is_empty() {
        let mut advance_pattern = true;
        match p[0] {
            b'*' => {
                while p.len() > 1 && p[1] == b'*' {
                    p = &p[1..];
                }
                if p.len() == 1 {
                    return true;
                }
                while !s.is_empty() {
                    if match_impl(&p[1..], s, skip_longer, nesting + 1) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    s = &s[1..];
                }
                // No match for the rest of the pattern anywhere in the rest of the string:
                // earlier stars cannot help either.
                *skip_longer = true;
                return false;
            }
            b'?' => s = &s[1..],
            b'[' => {
                p = &p[1..];
                let negate = p.first() == Some(&b'^');
                if negate {
                    p = &p[1..];
                }
                let mut matched = false;
                loop {
                    match p {
                        [b'\\', escaped, ..] => {
                            p = &p[1..];
                            if *escaped == s[0] {
                                matched = true;
                            }
                        }
                        [b']', ..] => break,
                        [] => {
                            // Unterminated class: Redis treats the end of the pattern as ']'.
                            advance_pattern = false;
                            break;
                        }
                        [start, b'-', end, ..] => {
                            let (lo, hi) = if start <= end {
                                (*start, *end)
                            } else {
                                (*end, *start)
                            };
                            p = &p[2..];
                            if (lo..=hi).contains(&s[0]) {
                                matched = true;
                            }
                        }
                        [c, ..] => {
                            if *c == s[0] {
                                matched = true;
                            }
                        }
                    }
                    p = &p[1..];
                }
                if negate {
                    matched = !matched;
                }
                if !matched {
                    return false;
                }
                s = &s[1..];
            }
            c => {
                let c = if c == b'\\' && p.len() >= 2 {
                    p = &p[1..];
                    p[0]
                } else {
                    c
                };
                if c != s[0] {
                    return false;
                }
                s = &s[1..];
            }
        }
        if advance_pattern {
            p = &p[1..];
        }
        if s.is_empty() {
            while p.first() == Some(&b'*') {
                p = &p[1..];
            }
            break;
        }
    }
    p.is_empty() && s.is_empty()
}

#[cfg(test)]
mod tests {
    use super::matches;

    fn m(p: &str, s: &str) -> bool {
        matches(p.as_bytes(), s.as_bytes())
    }

    #[test]
    fn redis_examples() {
        // The examples of the Redis KEYS / PSUBSCRIBE documentation.
        assert!(m("h?llo", "hello"));
        assert!(m("h?llo", "hallo"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h*llo", "hllo"));
        assert!(m("h*llo", "heeeello"));
        assert!(m("h[ae]llo", "hello"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(!m("h[a-b]llo", "hcllo"));
    }

    #[test]
    fn stars_escapes_and_edges() {
        // Redis 7: `*` does not match the empty channel (PUBLISH "" reaches no `*` pattern).
        assert!(!m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("news.*", "news.art"));
        assert!(!m("news.*", "news"));
        assert!(m("news.*", "news."));
        assert!(m("a**b", "ab"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("[z-a]", "m")); // reversed ranges are swapped, as in Redis
        assert!(m("[\\]]", "]"));
        assert!(m("ab[c", "abc")); // unterminated class
        assert!(!m("", "a"));
        assert!(m("", ""));
        assert!(!m("?", ""));
        assert!(m("orders.*.eu", "orders.new.eu"));
        assert!(!m("orders.*.eu", "orders.new.us"));
    }

    #[test]
    fn abusive_pattern_terminates() {
        let p = "a*".repeat(40) + "b";
        let s = "a".repeat(60);
        assert!(!m(&p, &s));
    }
}
