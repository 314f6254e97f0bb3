"""Which sharing unit answers which data (clause 7 of the Jilin regulation), with the names people read.

The gateway routes a requested data category to the units of the matching unit category; a connector refuses to
answer categories its unit does not hold. One table serves both.
"""

from __future__ import annotations

from collections.abc import Mapping

from hedui.v1 import records_pb2 as r

from common.config import ConfigError

UnitCategory = int
DataCategory = int

#: Clause 7, item by item: the data each kind of sharing unit provides.
UNIT_DATA: Mapping[UnitCategory, tuple[DataCategory, ...]] = {
    r.UNIT_CATEGORY_CIVIL_AFFAIRS: (
        r.DATA_CATEGORY_SOCIAL_ASSISTANCE,
        r.DATA_CATEGORY_MARRIAGE_RECORD,
        r.DATA_CATEGORY_DEATH_RECORD,
    ),
    r.UNIT_CATEGORY_EDUCATION: (r.DATA_CATEGORY_EDUCATION_AID,),
    r.UNIT_CATEGORY_PUBLIC_SECURITY: (r.DATA_CATEGORY_HOUSEHOLD_REGISTER, r.DATA_CATEGORY_VEHICLES),
    r.UNIT_CATEGORY_FINANCE: (r.DATA_CATEGORY_STATE_PAYROLL,),
    r.UNIT_CATEGORY_HUMAN_RESOURCES: (r.DATA_CATEGORY_SOCIAL_INSURANCE, r.DATA_CATEGORY_EMPLOYMENT),
    r.UNIT_CATEGORY_LAND: (r.DATA_CATEGORY_REAL_ESTATE,),
    r.UNIT_CATEGORY_HOUSING: (r.DATA_CATEGORY_HOUSING_FUND, r.DATA_CATEGORY_HOUSING_TRANSACTIONS),
    r.UNIT_CATEGORY_TRANSPORT: (r.DATA_CATEGORY_TRANSPORT_QUALIFICATION, r.DATA_CATEGORY_VESSELS),
    r.UNIT_CATEGORY_AGRICULTURE: (r.DATA_CATEGORY_AGRICULTURE_SUBSIDIES,),
    r.UNIT_CATEGORY_FORESTRY: (r.DATA_CATEGORY_FORESTRY_LOANS,),
    r.UNIT_CATEGORY_HEALTH: (r.DATA_CATEGORY_HEALTH_INSURANCE,),
    r.UNIT_CATEGORY_TAX: (r.DATA_CATEGORY_TAX,),
    r.UNIT_CATEGORY_MARKET_REGULATION: (r.DATA_CATEGORY_BUSINESS_REGISTRATION,),
    r.UNIT_CATEGORY_ESTABLISHMENT: (r.DATA_CATEGORY_CIVIL_SERVICE_POST,),
    r.UNIT_CATEGORY_DISABLED_FEDERATION: (r.DATA_CATEGORY_DISABILITY,),
    r.UNIT_CATEGORY_FINANCIAL_INSTITUTION: (
        r.DATA_CATEGORY_DEPOSITS,
        r.DATA_CATEGORY_LOANS,
        r.DATA_CATEGORY_WEALTH_PRODUCTS,
        r.DATA_CATEGORY_SECURITIES,
        r.DATA_CATEGORY_COMMERCIAL_INSURANCE,
    ),
    r.UNIT_CATEGORY_OTHER: (),
}

UNIT_NAMES: Mapping[UnitCategory, str] = {
    r.UNIT_CATEGORY_CIVIL_AFFAIRS: "民政",
    r.UNIT_CATEGORY_EDUCATION: "教育",
    r.UNIT_CATEGORY_PUBLIC_SECURITY: "公安",
    r.UNIT_CATEGORY_FINANCE: "财政",
    r.UNIT_CATEGORY_HUMAN_RESOURCES: "人力资源和社会保障",
    r.UNIT_CATEGORY_LAND: "国土资源（不动产登记）",
    r.UNIT_CATEGORY_HOUSING: "住房和城乡建设",
    r.UNIT_CATEGORY_TRANSPORT: "交通运输",
    r.UNIT_CATEGORY_AGRICULTURE: "农业",
    r.UNIT_CATEGORY_FORESTRY: "林业",
    r.UNIT_CATEGORY_HEALTH: "卫生计生",
    r.UNIT_CATEGORY_TAX: "税务",
    r.UNIT_CATEGORY_MARKET_REGULATION: "工商（市场监管）",
    r.UNIT_CATEGORY_ESTABLISHMENT: "机构编制",
    r.UNIT_CATEGORY_DISABLED_FEDERATION: "残联",
    r.UNIT_CATEGORY_FINANCIAL_INSTITUTION: "银行、证券、保险机构",
    r.UNIT_CATEGORY_OTHER: "其他",
}

DATA_NAMES: Mapping[DataCategory, str] = {
    r.DATA_CATEGORY_DEPOSITS: "存款",
    r.DATA_CATEGORY_LOANS: "贷款",
    r.DATA_CATEGORY_WEALTH_PRODUCTS: "理财产品",
    r.DATA_CATEGORY_SECURITIES: "证券、基金",
    r.DATA_CATEGORY_COMMERCIAL_INSURANCE: "商业保险",
    r.DATA_CATEGORY_REAL_ESTATE: "不动产",
    r.DATA_CATEGORY_VEHICLES: "机动车辆",
    r.DATA_CATEGORY_BUSINESS_REGISTRATION: "工商登记、股权",
    r.DATA_CATEGORY_TAX: "纳税",
    r.DATA_CATEGORY_SOCIAL_INSURANCE: "社会保险、养老金",
    r.DATA_CATEGORY_EMPLOYMENT: "就业、失业",
    r.DATA_CATEGORY_HOUSING_FUND: "住房公积金",
    r.DATA_CATEGORY_HOUSING_TRANSACTIONS: "房产交易",
    r.DATA_CATEGORY_AGRICULTURE_SUBSIDIES: "惠农补贴",
    r.DATA_CATEGORY_FORESTRY_LOANS: "林业贴息贷款",
    r.DATA_CATEGORY_HEALTH_INSURANCE: "医疗保险、大病医疗",
    r.DATA_CATEGORY_DISABILITY: "残疾人证",
    r.DATA_CATEGORY_CIVIL_SERVICE_POST: "机构编制（在编）",
    r.DATA_CATEGORY_HOUSEHOLD_REGISTER: "户籍",
    r.DATA_CATEGORY_DEATH_RECORD: "死亡（殡葬）",
    r.DATA_CATEGORY_MARRIAGE_RECORD: "婚姻登记",
    r.DATA_CATEGORY_SOCIAL_ASSISTANCE: "社会救助待遇",
    r.DATA_CATEGORY_EDUCATION_AID: "教育救助",
    r.DATA_CATEGORY_STATE_PAYROLL: "财政供养",
    r.DATA_CATEGORY_TRANSPORT_QUALIFICATION: "运输从业资格",
    r.DATA_CATEGORY_VESSELS: "船舶",
}

#: The Record oneof field that carries each data category's rows.
RECORD_FIELD: Mapping[DataCategory, str] = {
    r.DATA_CATEGORY_DEPOSITS: "deposit",
    r.DATA_CATEGORY_LOANS: "loan",
    r.DATA_CATEGORY_WEALTH_PRODUCTS: "wealth_product",
    r.DATA_CATEGORY_SECURITIES: "securities",
    r.DATA_CATEGORY_COMMERCIAL_INSURANCE: "commercial_insurance",
    r.DATA_CATEGORY_REAL_ESTATE: "real_estate",
    r.DATA_CATEGORY_VEHICLES: "vehicle",
    r.DATA_CATEGORY_BUSINESS_REGISTRATION: "business",
    r.DATA_CATEGORY_TAX: "tax",
    r.DATA_CATEGORY_SOCIAL_INSURANCE: "social_insurance",
    r.DATA_CATEGORY_EMPLOYMENT: "employment",
    r.DATA_CATEGORY_HOUSING_FUND: "housing_fund",
    r.DATA_CATEGORY_HOUSING_TRANSACTIONS: "housing_transaction",
    r.DATA_CATEGORY_AGRICULTURE_SUBSIDIES: "agriculture_subsidy",
    r.DATA_CATEGORY_FORESTRY_LOANS: "forestry_loan",
    r.DATA_CATEGORY_HEALTH_INSURANCE: "health_insurance",
    r.DATA_CATEGORY_DISABILITY: "disability",
    r.DATA_CATEGORY_CIVIL_SERVICE_POST: "civil_service_post",
    r.DATA_CATEGORY_HOUSEHOLD_REGISTER: "household_register",
    r.DATA_CATEGORY_DEATH_RECORD: "death",
    r.DATA_CATEGORY_MARRIAGE_RECORD: "marriage",
    r.DATA_CATEGORY_SOCIAL_ASSISTANCE: "social_assistance",
    r.DATA_CATEGORY_EDUCATION_AID: "education_aid",
    r.DATA_CATEGORY_STATE_PAYROLL: "state_payroll",
    r.DATA_CATEGORY_TRANSPORT_QUALIFICATION: "transport_qualification",
    r.DATA_CATEGORY_VESSELS: "vessel",
}

#: Categories a unit may answer as a threshold flag instead of amounts (data minimisation).
THRESHOLD_CAPABLE: frozenset[DataCategory] = frozenset({r.DATA_CATEGORY_DEPOSITS})


def unit_for(data_category: DataCategory) -> UnitCategory:
    """The unit category that holds ``data_category``."""
    for unit, data in UNIT_DATA.items():
        if data_category in data:
            return unit
    raise KeyError(f"no unit category holds data category {data_category}")


def data_category_name(category: DataCategory) -> str:
    """DATA_CATEGORY_REAL_ESTATE -> 'real_estate': the name config files and messages use."""
    return r.DataCategory.Name(category).removeprefix("DATA_CATEGORY_").lower()  # type: ignore[arg-type]


def data_category_names() -> list[str]:
    """Every data category's name, in proto order."""
    return [data_category_name(value) for name, value in r.DataCategory.items() if not name.endswith("UNSPECIFIED")]


def data_category_label(category: DataCategory) -> str:
    """'deposits (存款)': a data category as messages show it to people."""
    return f"{data_category_name(category)} ({DATA_NAMES[category]})"


def unit_category_by_name(name: str) -> int:
    """'tax' -> UNIT_CATEGORY_TAX."""
    try:
        return int(r.UnitCategory.Value("UNIT_CATEGORY_" + name.upper()))
    except ValueError as exc:
        names = ", ".join(n.removeprefix("UNIT_CATEGORY_").lower() for n in r.UnitCategory.keys()[1:])
        raise ConfigError(f"unknown unit category {name!r}; one of: {names}") from exc


def data_category_by_name(name: str) -> int:
    """'deposits' -> DATA_CATEGORY_DEPOSITS."""
    try:
        return int(r.DataCategory.Value("DATA_CATEGORY_" + name.upper()))
    except ValueError as exc:
        known = ", ".join(data_category_names())
        raise ConfigError(f"unknown data category {name!r}; the categories are {known}") from exc
