//! The symbolic sizes of an exported graph: SymPy expressions as `torch.export` writes
//! them (`srepr`: `Mul(Integer(4), Symbol('s28', positive=True, integer=True))`), parsed
//! into a small integer expression and evaluated once the symbols (the batch, a dynamic
//! sequence length) are bound.

use serde::{Deserialize, Serialize};

/// Nesting an expression may have.
pub const MAX_DEPTH: usize = 64;
/// Characters in one expression's text.
pub const MAX_TEXT: usize = 4096;

/// An integer expression over the file's symbols (indexes into the import's symbol
/// table). It crosses the wire and goes into plans as its text (`Mul(4, Symbol('#0'))`),
/// parsed back with the nesting limit, so that no frame can make a decoder recurse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Expr {
    Int(i64),
    Sym(u32),
    Add(Vec<Expr>),
    Mul(Vec<Expr>),
    /// Python's `a // b` (floor).
    FloorDiv(Box<Expr>, Box<Expr>),
    /// `ceil(a / b)`.
    CeilDiv(Box<Expr>, Box<Expr>),
    /// Python's `a % b`.
    Mod(Box<Expr>, Box<Expr>),
    Min(Vec<Expr>),
    Max(Vec<Expr>),
    /// `a ** n` for a whole `n ≥ 0`.
    Pow(Box<Expr>, u32),
}

impl Expr {
    /// The value with `symbols[i]` bound to symbol `i`; `None` when it overflows, divides
    /// by zero or names a symbol out of range.
    pub fn eval(&self, symbols: &[i64]) -> Option<i64> {
        Some(match self {
            Expr::Int(v) => *v,
            Expr::Sym(s) => *symbols.get(*s as usize)?,
            Expr::Add(xs) => xs.iter().try_fold(0i64, |acc, x| acc.checked_add(x.eval(symbols)?))?,
            Expr::Mul(xs) => xs.iter().try_fold(1i64, |acc, x| acc.checked_mul(x.eval(symbols)?))?,
            Expr::FloorDiv(a, b) => {
                let (a, b) = (a.eval(symbols)?, b.eval(symbols)?);
                if b == 0 {
                    return None;
                }
                floor_div(a, b)?
            }
            Expr::CeilDiv(a, b) => {
                let (a, b) = (a.eval(symbols)?, b.eval(symbols)?);
                if b == 0 {
                    return None;
                }
                floor_div(a.checked_neg()?, b)?.checked_neg()?
            }
            Expr::Mod(a, b) => {
                let (a, b) = (a.eval(symbols)?, b.eval(symbols)?);
                if b == 0 {
                    return None;
                }
                let r = a.checked_rem(b)?;
                if r != 0 && (r < 0) != (b < 0) { r + b } else { r }
            }
            Expr::Min(xs) => xs.iter().map(|x| x.eval(symbols)).collect::<Option<Vec<_>>>()?.into_iter().min()?,
            Expr::Max(xs) => xs.iter().map(|x| x.eval(symbols)).collect::<Option<Vec<_>>>()?.into_iter().max()?,
            Expr::Pow(a, n) => a.eval(symbols)?.checked_pow(*n)?,
        })
    }

    /// Whether the expression reads symbol `s`.
    pub fn reads(&self, s: u32) -> bool {
        match self {
            Expr::Int(_) => false,
            Expr::Sym(t) => *t == s,
            Expr::Add(xs) | Expr::Mul(xs) | Expr::Min(xs) | Expr::Max(xs) => xs.iter().any(|x| x.reads(s)),
            Expr::FloorDiv(a, b) | Expr::CeilDiv(a, b) | Expr::Mod(a, b) => a.reads(s) || b.reads(s),
            Expr::Pow(a, _) => a.reads(s),
        }
    }
}

impl std::fmt::Display for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |f: &mut std::fmt::Formatter<'_>, name: &str, xs: &[&Expr]| -> std::fmt::Result {
            write!(f, "{name}(")?;
            for (i, x) in xs.iter().enumerate() {
                if i > 0 {
                    write!(f, ", ")?;
                }
                write!(f, "{x}")?;
            }
            write!(f, ")")
        };
        match self {
            Expr::Int(v) => write!(f, "{v}"),
            Expr::Sym(s) => write!(f, "Symbol('#{s}')"),
            Expr::Add(xs) => list(f, "Add", &xs.iter().collect::<Vec<_>>()),
            Expr::Mul(xs) => list(f, "Mul", &xs.iter().collect::<Vec<_>>()),
            Expr::Min(xs) => list(f, "Min", &xs.iter().collect::<Vec<_>>()),
            Expr::Max(xs) => list(f, "Max", &xs.iter().collect::<Vec<_>>()),
            Expr::FloorDiv(a, b) => list(f, "FloorDiv", &[a, b]),
            Expr::CeilDiv(a, b) => list(f, "CeilDiv", &[a, b]),
            Expr::Mod(a, b) => list(f, "Mod", &[a, b]),
            Expr::Pow(a, n) => write!(f, "Pow({a}, {n})"),
        }
    }
}

impl From<Expr> for String {
    fn from(e: Expr) -> String {
        e.to_string()
    }
}

impl TryFrom<String> for Expr {
    type Error = String;
    fn try_from(text: String) -> Result<Expr, String> {
        parse(&text, &mut |name| {
            name.strip_prefix('#').and_then(|n| n.parse().ok()).ok_or_else(|| format!("a symbol {name:?}"))
        })
    }
}

/// Python's `a // b` for `b != 0`.
fn floor_div(a: i64, b: i64) -> Option<i64> {
    let q = a.checked_div(b)?;
    Some(if a % b != 0 && ((a < 0) != (b < 0)) { q - 1 } else { q })
}

/// Parses `text`; `symbol` turns a symbol's name into its index (adding it to the
/// caller's table). Errors say what was not understood.
pub fn parse(text: &str, symbol: &mut dyn FnMut(&str) -> Result<u32, String>) -> Result<Expr, String> {
    if text.len() > MAX_TEXT {
        return Err(format!("a size expression of {} characters (the limit is {MAX_TEXT})", text.len()));
    }
    let mut p = Parser { s: text.as_bytes(), at: 0, symbol };
    let e = p.expr(0)?;
    p.ws();
    if p.at != p.s.len() {
        return Err(format!("unexpected text after a size expression: {:?}", crate::units::clip(text, 80)));
    }
    Ok(e)
}

struct Parser<'a, 'b> {
    s: &'a [u8],
    at: usize,
    symbol: &'b mut dyn FnMut(&str) -> Result<u32, String>,
}

impl Parser<'_, '_> {
    fn ws(&mut self) {
        while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> &str {
        self.ws();
        let start = self.at;
        while self.at < self.s.len() && (self.s[self.at].is_ascii_alphanumeric() || self.s[self.at] == b'_') {
            self.at += 1;
        }
        std::str::from_utf8(&self.s[start..self.at]).unwrap_or("")
    }

    fn int(&mut self) -> Result<i64, String> {
        self.ws();
        let start = self.at;
        if self.s.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        while self.at < self.s.len() && self.s[self.at].is_ascii_digit() {
            self.at += 1;
        }
        std::str::from_utf8(&self.s[start..self.at])
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| "a whole number that does not fit 64 bits".to_owned())
    }

    /// `'name'` then any `key=value` keywords up to the closing parenthesis.
    fn symbol_args(&mut self) -> Result<String, String> {
        if !self.eat(b'\'') {
            return Err("a Symbol without a quoted name".into());
        }
        let start = self.at;
        while self.at < self.s.len() && self.s[self.at] != b'\'' {
            self.at += 1;
        }
        let name = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("").to_owned();
        if !self.eat(b'\'') || name.is_empty() || name.len() > 64 {
            return Err("a Symbol's name is not closed".into());
        }
        while self.eat(b',') {
            self.ident();
            if !self.eat(b'=') {
                return Err("a Symbol keyword without a value".into());
            }
            self.ident();
        }
        Ok(name)
    }

    fn args(&mut self, depth: usize) -> Result<Vec<Expr>, String> {
        let mut out = vec![self.expr(depth + 1)?];
        while self.eat(b',') {
            out.push(self.expr(depth + 1)?);
        }
        Ok(out)
    }

    fn expr(&mut self, depth: usize) -> Result<Expr, String> {
        if depth > MAX_DEPTH {
            return Err(format!("a size expression nested deeper than {MAX_DEPTH}"));
        }
        self.ws();
        if self.s.get(self.at).is_some_and(|c| c.is_ascii_digit() || *c == b'-') {
            return Ok(Expr::Int(self.int()?));
        }
        let name = self.ident().to_owned();
        if !self.eat(b'(') {
            return Err(format!("expected '(' after {name:?} in a size expression"));
        }
        let two = |v: Vec<Expr>, f: fn(Box<Expr>, Box<Expr>) -> Expr| -> Result<Expr, String> {
            match <[Expr; 2]>::try_from(v) {
                Ok([a, b]) => Ok(f(Box::new(a), Box::new(b))),
                Err(_) => Err(format!("{name} takes two arguments")),
            }
        };
        let e = match name.as_str() {
            "Integer" => Expr::Int(self.int()?),
            "Symbol" => {
                let n = self.symbol_args()?;
                Expr::Sym((self.symbol)(&n)?)
            }
            "Add" => Expr::Add(self.args(depth)?),
            "Mul" => Expr::Mul(self.args(depth)?),
            "Min" => Expr::Min(self.args(depth)?),
            "Max" => Expr::Max(self.args(depth)?),
            "FloorDiv" => two(self.args(depth)?, Expr::FloorDiv)?,
            "CeilDiv" => two(self.args(depth)?, Expr::CeilDiv)?,
            "Mod" | "PythonMod" => two(self.args(depth)?, Expr::Mod)?,
            "Pow" => {
                let base = self.expr(depth + 1)?;
                if !self.eat(b',') {
                    return Err("Pow takes two arguments".into());
                }
                let n = match self.expr(depth + 1)? {
                    Expr::Int(n) if (0..=64).contains(&n) => n as u32,
                    _ => return Err("Pow with an exponent other than a small whole number".into()),
                };
                Expr::Pow(Box::new(base), n)
            }
            other => {
                return Err(format!(
                    "the size expression function {:?} is not supported (sizes must be whole-number arithmetic of the dynamic dimensions)",
                    crate::units::clip(other, 40)
                ));
            }
        };
        if !self.eat(b')') {
            return Err(format!("{name}(...) is not closed"));
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Expr, String> {
        let mut names: Vec<String> = Vec::new();
        parse(text, &mut |n| {
            if let Some(i) = names.iter().position(|x| x == n) {
                return Ok(i as u32);
            }
            names.push(n.to_owned());
            Ok((names.len() - 1) as u32)
        })
    }

    #[test]
    fn torch_export_sizes_parse_and_evaluate() {
        let e = p("Mul(Integer(4), Symbol('s28', positive=True, integer=True))").expect("parses");
        assert_eq!(e.eval(&[3]), Some(12));
        let e = p("Min(Integer(64), Mul(Integer(64), Symbol('s28', positive=True, integer=True)))").expect("parses");
        assert_eq!(e.eval(&[3]), Some(64));
        let e = p("Add(Symbol('s1', integer=True), Integer(-1))").expect("parses");
        assert_eq!(e.eval(&[10]), Some(9));
        let e = p("FloorDiv(Add(Symbol('s0', positive=True, integer=True), Integer(-1)), Integer(2))").expect("parses");
        assert_eq!(e.eval(&[7]), Some(3));
        let e = p("CeilDiv(Symbol('s0', integer=True), Integer(4))").expect("parses");
        assert_eq!(e.eval(&[9]), Some(3));
        let e = p("PythonMod(Integer(-7), Integer(3))").expect("parses");
        assert_eq!(e.eval(&[]), Some(2));
        assert_eq!(p("Pow(Symbol('s0'), Integer(2))").expect("parses").eval(&[5]), Some(25));
    }

    #[test]
    fn the_text_form_round_trips_and_limits_nesting() {
        let e = p("Min(Integer(64), FloorDiv(Add(Symbol('a'), Integer(-1)), Pow(Symbol('b'), Integer(2))))")
            .expect("parses");
        let back = Expr::try_from(String::from(e.clone())).expect("round trips");
        assert_eq!(back, e);
        let json = serde_json::to_string(&e).expect("json");
        assert_eq!(serde_json::from_str::<Expr>(&json).expect("json back"), e);
        let deep = format!("\"{}1{}\"", "Add(".repeat(10_000), ")".repeat(10_000));
        assert!(serde_json::from_str::<Expr>(&deep).is_err(), "nesting past the limit is refused, not recursed into");
    }

    #[test]
    fn odd_and_hostile_expressions_are_refused() {
        assert!(p("Sin(Integer(1))").expect_err("refused").contains("not supported"));
        assert!(p("Mul(Integer(2)").expect_err("refused").contains("not closed"));
        let deep = "Add(".repeat(100) + "Integer(1)" + &")".repeat(100);
        assert!(p(&deep).expect_err("refused").contains("deeper"));
        assert!(p(&"1".repeat(5000)).expect_err("refused").contains("limit"));
        let big = p("Mul(Integer(9223372036854775807), Symbol('s0'))").expect("parses");
        assert_eq!(big.eval(&[2]), None);
        assert_eq!(p("FloorDiv(Integer(1), Integer(0))").expect("parses").eval(&[]), None);
    }
}
